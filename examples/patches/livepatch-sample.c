/*
 * livepatch-sample: the user-space twin of the kernel's
 * samples/livepatch/livepatch-sample.c. It replaces greeting() of the
 * greeter program; while the patch is enabled the program prints
 * "this has been live patched".
 *
 *   cc -shared -fPIC -O2 -I"$(livepatch include-path)" \
 *      -o livepatch-sample.so livepatch-sample.c
 *   livepatch load "$(pidof greeter)" ./livepatch-sample.so
 */
#include <livepatch.h>

static const char *livepatch_greeting(void)
{
	return "this has been live patched";
}

static struct klp_func funcs[] = {
	{
		.old_name = "greeting",
		.new_func = livepatch_greeting,
	},
	{}
};

static struct klp_object objs[] = {
	{
		/* name being NULL means the main executable */
		.funcs = funcs,
	},
	{}
};

static struct klp_patch patch = {
	.name = "livepatch_sample",
	.objs = objs,
};

KLP_PATCH(patch);
