/*
 * shadow-host: the user-space twin of the kernel's
 * samples/livepatch/livepatch-shadow-mod.c. It allocates "dummy" objects
 * and frees them when they expire; dummy_alloc() leaks a small buffer per
 * object. livepatch-shadow-fix1 fixes the leak with a shadow variable,
 * livepatch-shadow-fix2 adds a per-object counter.
 *
 * Each tick prints the live objects and leaked buffers. Quit with "quit"
 * on stdin or SIGTERM. Build with -rdynamic: the patches call
 * leak_release().
 */
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct dummy {
	struct dummy *next;
	unsigned long expire;
};

static struct dummy *dummies;
unsigned long now;
static volatile sig_atomic_t stop;
long leaked_buffers;
long live_dummies;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

/* Frees a buffer dummy_alloc() leaked; patches call it. */
void leak_release(void *leak)
{
	free(leak);
	leaked_buffers--;
}

__attribute__((noinline, noipa)) struct dummy *dummy_alloc(void)
{
	struct dummy *d = calloc(1, sizeof(*d));
	int *leak = malloc(sizeof(int));

	if (!d || !leak)
		abort();
	leaked_buffers++;
	live_dummies++;
	d->expire = now + 1 + (unsigned long)(rand() % 3);
	return d;
}

__attribute__((noinline, noipa)) void dummy_free(struct dummy *d)
{
	free(d);
	live_dummies--;
}

__attribute__((noinline, noipa)) int dummy_check(struct dummy *d, unsigned long t)
{
	return t >= d->expire;
}

int main(int argc, char **argv)
{
	int tick_ms = argc > 1 ? atoi(argv[1]) : 200;
	struct pollfd in = { .fd = 0, .events = POLLIN };

	signal(SIGTERM, on_term);
	setvbuf(stdout, NULL, _IOLBF, 0);
	srand(1);
	while (!stop) {
		struct dummy **pp = &dummies;
		struct dummy *d = dummy_alloc();

		d->next = dummies;
		dummies = d;
		while (*pp) {
			if (dummy_check(*pp, now)) {
				struct dummy *gone = *pp;
				*pp = gone->next;
				dummy_free(gone);
			} else {
				pp = &(*pp)->next;
			}
		}
		printf("shadow-host: tick %lu: %ld objects, %ld leaked buffers\n", now, live_dummies,
		       leaked_buffers);
		now++;
		if (poll(&in, 1, tick_ms) > 0) {
			char line[64];
			if (!fgets(line, sizeof(line), stdin) || !strncmp(line, "quit", 4))
				break;
		}
	}
	return 0;
}
