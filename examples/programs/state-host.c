/*
 * state-host: a program with a global setting that patches change
 * (console_loglevel, as in the kernel's test_klp_state modules). It prints
 * the setting every tick. Build with -rdynamic: the patches change it.
 */
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int console_loglevel = 7;
static volatile sig_atomic_t stop;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

int main(int argc, char **argv)
{
	int tick_ms = argc > 1 ? atoi(argv[1]) : 500;
	struct pollfd in = { .fd = 0, .events = POLLIN };

	signal(SIGTERM, on_term);
	setvbuf(stdout, NULL, _IOLBF, 0);
	while (!stop) {
		printf("state-host: console_loglevel %d\n", console_loglevel);
		if (poll(&in, 1, tick_ms) > 0) {
			char line[64];
			if (!fgets(line, sizeof(line), stdin) || !strncmp(line, "quit", 4))
				break;
		}
	}
	return 0;
}
