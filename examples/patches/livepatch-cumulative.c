/*
 * livepatch-cumulative: a cumulative patch (replace = true) for greeter.
 * It carries every fix that should be active: a new greeting and a fixed
 * farewell(). Loading it replaces livepatch-sample atomically; a patch it
 * does not carry a fix for goes back to the original code.
 */
#include <stdio.h>
#include <livepatch.h>

static const char *cumulative_greeting(void)
{
	return "this has been live patched, cumulatively";
}

static int cumulative_farewell(char *buf, size_t len)
{
	return snprintf(buf, len, "goodbye from the cumulative patch");
}

static struct klp_func funcs[] = {
	{ .old_name = "greeting", .new_func = cumulative_greeting },
	{ .old_name = "farewell", .new_func = cumulative_farewell },
	{}
};

static struct klp_object objs[] = {
	{ .funcs = funcs },
	{}
};

static struct klp_patch patch = {
	.name = "livepatch_cumulative",
	.objs = objs,
	.replace = true,
};

KLP_PATCH(patch);
