/*
 * livepatch-shadow-fix1: the user-space twin of the kernel's
 * samples/livepatch/livepatch-shadow-fix1.c. dummy_alloc() keeps the buffer
 * it allocates in a shadow variable of the object, and dummy_free() frees it,
 * so objects allocated after the patch no longer leak.
 */
#include <stdlib.h>
#include <livepatch.h>

#define SV_LEAK 1

struct dummy {
	struct dummy *next;
	unsigned long expire;
};

/* In the host program (built with -rdynamic). */
extern long leaked_buffers;
extern long live_dummies;
extern unsigned long now;
extern void leak_release(void *leak);

static int shadow_leak_ctor(void *obj, void *shadow_data, void *ctor_data)
{
	(void)obj;
	*(void **)shadow_data = *(void **)ctor_data;
	return 0;
}

static void shadow_leak_dtor(void *obj, void *shadow_data)
{
	(void)obj;
	leak_release(*(void **)shadow_data);
}

static struct dummy *livepatch_fix1_dummy_alloc(void)
{
	struct dummy *d = calloc(1, sizeof(*d));
	void *leak = malloc(sizeof(int));

	if (!d || !leak)
		abort();
	leaked_buffers++;
	live_dummies++;
	d->expire = now + 1 + (unsigned long)(rand() % 3);
	klp_shadow_alloc(d, SV_LEAK, sizeof(leak), GFP_KERNEL, shadow_leak_ctor, &leak);
	return d;
}

static void livepatch_fix1_dummy_free(struct dummy *d)
{
	klp_shadow_free(d, SV_LEAK, shadow_leak_dtor);
	free(d);
	live_dummies--;
}

/* Buffers of objects still alive when the patch goes are released. */
static void post_unpatch(struct klp_object *obj)
{
	(void)obj;
	klp_shadow_free_all(SV_LEAK, shadow_leak_dtor);
}

static struct klp_func funcs[] = {
	{ .old_name = "dummy_alloc", .new_func = livepatch_fix1_dummy_alloc },
	{ .old_name = "dummy_free", .new_func = livepatch_fix1_dummy_free },
	{}
};

static struct klp_object objs[] = {
	{ .funcs = funcs, .callbacks = { .post_unpatch = post_unpatch } },
	{}
};

static struct klp_patch patch = {
	.name = "livepatch_shadow_fix1",
	.objs = objs,
};

KLP_PATCH(patch);
