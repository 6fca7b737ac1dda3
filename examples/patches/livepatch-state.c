/*
 * livepatch-state: a patch that changes a system state, with per-state
 * callbacks. Built twice from this file: STATE_VERSION=1 gives
 * livepatch-state-v1, STATE_VERSION=2 a cumulative successor that takes
 * the state over. The state (id 1) is "console_loglevel raised to 15":
 *   setup    allocates room to remember the old level (new state only)
 *   enable   raises the level once every thread runs the patch
 *   disable  restores the level before the patch goes away
 *   release  frees the room
 * A version 2 patch replacing version 1 inherits the state: none of these
 * run, and it takes the remembered level over in its pre_patch callback.
 * Loading version 1 over version 2 is refused (a downgrade).
 */
#include <stdlib.h>
#include <livepatch.h>

#ifndef STATE_VERSION
#define STATE_VERSION 1
#endif
#define LOGLEVEL_STATE 1
#define MOTORMOUTH 15

#define STR2(x) #x
#define STR(x) STR2(x)
#define NAME "livepatch_state_v" STR(STATE_VERSION)

extern int console_loglevel;

static int setup(struct klp_patch *patch, struct klp_state *state)
{
	(void)patch;
	state->data = malloc(sizeof(int));
	if (!state->data)
		return -12;
	klp_log(NAME ": setup: allocated room for the console_loglevel");
	return 0;
}

static void enable(struct klp_patch *patch, struct klp_state *state)
{
	(void)patch;
	*(int *)state->data = console_loglevel;
	console_loglevel = MOTORMOUTH;
	klp_log(NAME ": enable: console_loglevel raised to %d", MOTORMOUTH);
}

static void disable(struct klp_patch *patch, struct klp_state *state)
{
	(void)patch;
	console_loglevel = *(int *)state->data;
	klp_log(NAME ": disable: console_loglevel restored to %d", console_loglevel);
}

static void release(struct klp_patch *patch, struct klp_state *state)
{
	(void)patch;
	free(state->data);
	state->data = NULL;
	klp_log(NAME ": release: freed the room");
}

static struct klp_state states[] = {
	{
		.id = LOGLEVEL_STATE,
		.version = STATE_VERSION,
		.callbacks = {
			.setup = setup,
			.enable = enable,
			.disable = disable,
			.release = release,
		},
	},
	{}
};

static struct klp_patch patch;

/* Takes the state over from the patch being replaced. */
static int pre_patch(struct klp_object *obj)
{
	struct klp_state *prev = klp_get_prev_state(LOGLEVEL_STATE);

	(void)obj;
	if (prev) {
		klp_get_state(&patch, LOGLEVEL_STATE)->data = prev->data;
		klp_log(NAME ": pre_patch: taking over the console_loglevel change");
	}
	return 0;
}

static struct klp_func no_funcs[] = { {} };

static struct klp_object objs[] = {
	{ .funcs = no_funcs, .callbacks = { .pre_patch = pre_patch } },
	{}
};

static struct klp_patch patch = {
	.name = NAME,
	.objs = objs,
	.states = states,
	.replace = true,
};

KLP_PATCH(patch);
