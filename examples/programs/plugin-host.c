/*
 * plugin-host: loads a plugin library later, when told to, like a program
 * that dlopens modules on demand. Commands on stdin, one per line:
 *   load    dlopen the plugin (argv[1]) and call its plugin_hello()
 *   call    call plugin_hello() again
 *   unload  dlclose the plugin
 *   quit
 * Used by examples/patches/livepatch-callbacks-demo.c.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

typedef const char *(*hello_fn)(void);

int main(int argc, char **argv)
{
	void *plugin = NULL;
	hello_fn hello = NULL;
	char line[128];

	if (argc < 2) {
		fprintf(stderr, "usage: plugin-host PLUGIN.so\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("plugin-host: ready\n");
	while (fgets(line, sizeof(line), stdin)) {
		if (!strncmp(line, "load", 4)) {
			plugin = dlopen(argv[1], RTLD_NOW);
			if (!plugin) {
				printf("plugin-host: load failed: %s\n", dlerror());
				continue;
			}
			hello = (hello_fn)dlsym(plugin, "plugin_hello");
			printf("plugin-host: loaded: %s\n", hello ? hello() : "(no plugin_hello)");
		} else if (!strncmp(line, "call", 4)) {
			printf("plugin-host: %s\n", hello ? hello() : "(no plugin)");
		} else if (!strncmp(line, "unload", 6)) {
			if (plugin)
				dlclose(plugin);
			plugin = NULL;
			hello = NULL;
			printf("plugin-host: unloaded\n");
		} else if (!strncmp(line, "quit", 4)) {
			break;
		}
	}
	return 0;
}
