/*
 * livepatch-shadow-fix2: the user-space twin of the kernel's
 * samples/livepatch/livepatch-shadow-fix2.c, stacked on fix1. It counts how
 * often each object was checked, in a second shadow variable, and logs the
 * count when the object is freed.
 */
#include <stdlib.h>
#include <livepatch.h>

#define SV_LEAK 1
#define SV_COUNTER 2

struct dummy {
	struct dummy *next;
	unsigned long expire;
};

extern long live_dummies;
extern void leak_release(void *leak);

static void shadow_leak_dtor(void *obj, void *shadow_data)
{
	(void)obj;
	leak_release(*(void **)shadow_data);
}

static int livepatch_fix2_dummy_check(struct dummy *d, unsigned long t)
{
	int *count = klp_shadow_get_or_alloc(d, SV_COUNTER, sizeof(*count), GFP_KERNEL, NULL, NULL);

	if (count)
		(*count)++;
	return t >= d->expire;
}

static void livepatch_fix2_dummy_free(struct dummy *d)
{
	int *count = klp_shadow_get(d, SV_COUNTER);

	if (count) {
		klp_log("livepatch_shadow_fix2: dummy %p checked %d times", (void *)d, *count);
		klp_shadow_free(d, SV_COUNTER, NULL);
	}
	klp_shadow_free(d, SV_LEAK, shadow_leak_dtor);
	free(d);
	live_dummies--;
}

static void post_unpatch(struct klp_object *obj)
{
	(void)obj;
	klp_shadow_free_all(SV_COUNTER, NULL);
}

static struct klp_func funcs[] = {
	{ .old_name = "dummy_check", .new_func = livepatch_fix2_dummy_check },
	{ .old_name = "dummy_free", .new_func = livepatch_fix2_dummy_free },
	{}
};

static struct klp_object objs[] = {
	{ .funcs = funcs, .callbacks = { .post_unpatch = post_unpatch } },
	{}
};

static struct klp_patch patch = {
	.name = "livepatch_shadow_fix2",
	.objs = objs,
};

KLP_PATCH(patch);
