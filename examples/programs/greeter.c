/*
 * greeter: a small service whose greeting is wrong. It prints one line per
 * tick until it reads "quit" on stdin or gets SIGTERM.
 *
 *   greeter [TICK_MS]
 *
 * Patch it live with examples/patches/livepatch-sample.c.
 */
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

/* The function to fix. noinline: a patch replaces calls to it. */
__attribute__((noinline, noipa)) const char *greeting(void)
{
	return "hello from the original greeting";
}

__attribute__((noinline, noipa)) int farewell(char *buf, size_t len)
{
	return snprintf(buf, len, "goodbye from the original farewell");
}

int main(int argc, char **argv)
{
	int tick_ms = argc > 1 ? atoi(argv[1]) : 500;
	unsigned long n = 0;
	struct pollfd in = { .fd = 0, .events = POLLIN };

	signal(SIGTERM, on_term);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("greeter: pid %d\n", (int)getpid());
	while (!stop) {
		printf("greeter: %lu: %s\n", n++, greeting());
		if (poll(&in, 1, tick_ms) > 0) {
			char line[64];
			if (!fgets(line, sizeof(line), stdin) || !strncmp(line, "quit", 4))
				break;
			if (!strncmp(line, "bye", 3)) {
				char buf[128];
				farewell(buf, sizeof(buf));
				printf("greeter: %s\n", buf);
			}
		}
	}
	printf("greeter: exiting\n");
	return 0;
}
