/*
 * livepatch.h - write live patches for running processes.
 *
 * A patch is a shared library that declares one `struct klp_patch` with
 * KLP_PATCH(). Loading it into a process that runs the livepatch agent
 * (`livepatch load PID PATCH.so`) enables the patch, with the semantics of
 * the Linux kernel's livepatch: per-thread consistency, atomic replace,
 * callbacks, shadow variables and system states. The structures keep the
 * kernel's field names, so kernel livepatch modules port with few changes.
 *
 *   #include <livepatch.h>
 *
 *   static int fixed_parse(const char *s) { ... }
 *
 *   static struct klp_func funcs[] = {
 *       { .old_name = "parse", .new_func = fixed_parse },
 *       { }
 *   };
 *   static struct klp_object objs[] = {
 *       { .name = NULL, .funcs = funcs },   // NULL: the main executable
 *       { }
 *   };
 *   static struct klp_patch patch = { .objs = objs };
 *   KLP_PATCH(patch);
 *
 * Build it with: cc -shared -fPIC -O2 -I"$(livepatch include-path)" -o fix.so fix.c
 */
#ifndef LIVEPATCH_H
#define LIVEPATCH_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* States of a thread (see `livepatch status`): -1 idle, 0 unpatched, 1 patched. */
#define KLP_TRANSITION_IDLE (-1)
#define KLP_TRANSITION_UNPATCHED 0
#define KLP_TRANSITION_PATCHED 1

/*
 * One function to replace.
 * @old_name:   name of the function in the object's symbol table.
 * @new_func:   the replacement; same signature as the original.
 * @old_sympos: which of several symbols named @old_name (static functions of
 *              different files): 0 requires the name to be unique, N picks
 *              the Nth in symbol-table order.
 * An array of funcs ends with an entry whose @old_name is NULL.
 */
struct klp_func {
	const char *old_name;
	void *new_func;
	unsigned long old_sympos;
};

struct klp_object;
struct klp_patch;
struct klp_state;

/*
 * Per-object callbacks, all optional.
 * @pre_patch:    before the object is patched; a non-zero (negative errno)
 *                result refuses the patch (or the loading library).
 * @post_patch:   after every thread runs the patched code.
 * @pre_unpatch:  before the object is unpatched.
 * @post_unpatch: after every thread runs the unpatched code; only if
 *                @pre_patch succeeded.
 * @post_unpatch_enabled: internal to the agent; leave it zero.
 */
struct klp_callbacks {
	int (*pre_patch)(struct klp_object *obj);
	void (*post_patch)(struct klp_object *obj);
	void (*pre_unpatch)(struct klp_object *obj);
	void (*post_unpatch)(struct klp_object *obj);
	bool post_unpatch_enabled;
};

/*
 * An object to patch.
 * @name:  a shared library, by file name ("libz.so.1") or DT_SONAME; NULL
 *         for the main executable.
 * @funcs: the functions to replace, ending with an empty entry; an object
 *         may have only callbacks (funcs = an array holding just { }).
 * @build_id: NULL, or the GNU build id of the object the patch was written
 *         for, in hex as `readelf -n` or `file` print it. The patch is
 *         refused when the loaded object has another build id (or none), and
 *         a later dlopen of a different build of the library fails.
 * An array of objects ends with an entry whose @name and @funcs are NULL.
 */
struct klp_object {
	const char *name;
	struct klp_func *funcs;
	struct klp_callbacks callbacks;
	const char *build_id;
};

/*
 * Per-state callbacks, all optional.
 * @setup:   before patching, only when no enabled patch has the state yet;
 *           a non-zero result refuses the patch.
 * @enable:  after the patching transition, only when the state is new.
 * @disable: before unpatching when no other patch keeps the state; also
 *           before a replacing patch that does not carry the state takes
 *           over (the old patch's callback is used).
 * @release: after unpatching or replacement, with the same rules, only if
 *           @setup succeeded.
 * @setup_succeeded: internal to the agent; leave it zero.
 */
struct klp_state_callbacks {
	int (*setup)(struct klp_patch *patch, struct klp_state *state);
	void (*enable)(struct klp_patch *patch, struct klp_state *state);
	void (*disable)(struct klp_patch *patch, struct klp_state *state);
	void (*release)(struct klp_patch *patch, struct klp_state *state);
	bool setup_succeeded;
};

/*
 * A change of the system that a patch makes and that later patches must
 * know about.
 * @id:        non-zero identifier; an array of states ends with id 0.
 * @version:   version of the change; a replacing patch must carry every
 *             state of the enabled patches with at least the same version
 *             (or the old patch must be able to remove it: see @disable).
 * @callbacks: per-state callbacks.
 * @data:      for the patch author.
 */
struct klp_state {
	unsigned long id;
	unsigned int version;
	struct klp_state_callbacks callbacks;
	void *data;
};

/*
 * A patch.
 * @name:    the patch name; NULL: the library's file name without a leading
 *           "lib" and the ".so" suffix.
 * @objs:    the objects to patch.
 * @states:  the system states the patch changes, or NULL.
 * @replace: cumulative patch: replaces every enabled patch atomically.
 */
struct klp_patch {
	const char *name;
	struct klp_object *objs;
	struct klp_state *states;
	bool replace;
};

/* Declares @patch as the library's patch: loading the library enables it. */
#define KLP_PATCH(patch)                                                      \
	__attribute__((visibility("default"), used)) struct klp_patch         \
		*const klp_patch_declaration = &(patch)

/* Shadow variables: data attached to existing objects by address. */
typedef unsigned int gfp_t;
#define GFP_KERNEL 0u
#define GFP_ATOMIC 0u

typedef int (*klp_shadow_ctor_t)(void *obj, void *shadow_data, void *ctor_data);
typedef void (*klp_shadow_dtor_t)(void *obj, void *shadow_data);

void *klp_shadow_get(void *obj, unsigned long id);
void *klp_shadow_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp_flags,
		       klp_shadow_ctor_t ctor, void *ctor_data);
void *klp_shadow_get_or_alloc(void *obj, unsigned long id, size_t size,
			      gfp_t gfp_flags, klp_shadow_ctor_t ctor,
			      void *ctor_data);
void klp_shadow_free(void *obj, unsigned long id, klp_shadow_dtor_t dtor);
void klp_shadow_free_all(unsigned long id, klp_shadow_dtor_t dtor);

/* System states. */
struct klp_state *klp_get_state(struct klp_patch *patch, unsigned long id);
struct klp_state *klp_get_prev_state(unsigned long id);

/*
 * A switch point: call it where no patched function is on the calling
 * thread's stack (the top of an event loop). A thread that still has to
 * switch to the patch in transition switches here at once.
 */
void klp_update_patch_state(void);

/* Writes one line into the agent's log (and to stderr with LIVEPATCH_LOG=stderr). */
void klp_log_line(const char *line);

/* printf-style klp_log_line(). */
static inline __attribute__((format(printf, 1, 2))) void klp_log(const char *fmt, ...)
{
	char line[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	klp_log_line(line);
}

#ifdef __cplusplus
}
#endif

#endif /* LIVEPATCH_H */
