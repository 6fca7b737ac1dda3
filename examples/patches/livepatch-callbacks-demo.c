/*
 * livepatch-callbacks-demo: the user-space twin of the kernel's
 * samples/livepatch/livepatch-callbacks-demo.c. Every object has the four
 * callbacks, which log what they are called for. The plugin object is
 * patched when plugin-host loads it, even if that happens after the patch
 * was enabled ("applying patch ... to loading module ...").
 */
#include <livepatch.h>

static const char *name_of(struct klp_object *obj)
{
	return obj->name ? obj->name : "vmlinux";
}

static int pre_patch_callback(struct klp_object *obj)
{
	klp_log("livepatch_callbacks_demo: pre_patch_callback: %s", name_of(obj));
	return 0;
}

static void post_patch_callback(struct klp_object *obj)
{
	klp_log("livepatch_callbacks_demo: post_patch_callback: %s", name_of(obj));
}

static void pre_unpatch_callback(struct klp_object *obj)
{
	klp_log("livepatch_callbacks_demo: pre_unpatch_callback: %s", name_of(obj));
}

static void post_unpatch_callback(struct klp_object *obj)
{
	klp_log("livepatch_callbacks_demo: post_unpatch_callback: %s", name_of(obj));
}

static const char *patched_plugin_hello(void)
{
	return "hello from the patched plugin";
}

static struct klp_func no_funcs[] = { {} };

static struct klp_func plugin_funcs[] = {
	{ .old_name = "plugin_hello", .new_func = patched_plugin_hello },
	{}
};

#define CALLBACKS                                                             \
	{                                                                     \
		.pre_patch = pre_patch_callback,                              \
		.post_patch = post_patch_callback,                            \
		.pre_unpatch = pre_unpatch_callback,                          \
		.post_unpatch = post_unpatch_callback,                        \
	}

static struct klp_object objs[] = {
	{ .name = NULL, .funcs = no_funcs, .callbacks = CALLBACKS },
	{ .name = "libcallbacks-mod.so", .funcs = plugin_funcs, .callbacks = CALLBACKS },
	{}
};

static struct klp_patch patch = {
	.name = "livepatch_callbacks_demo",
	.objs = objs,
};

KLP_PATCH(patch);
