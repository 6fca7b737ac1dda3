/*
 * libcallbacks-mod.so: the plugin plugin-host loads on demand; the
 * user-space twin of the kernel's livepatch-callbacks-mod.
 */
#include <stdio.h>

__attribute__((constructor)) static void callbacks_mod_init(void)
{
	printf("callbacks_mod: callbacks_mod_init\n");
	fflush(stdout);
}

__attribute__((destructor)) static void callbacks_mod_exit(void)
{
	printf("callbacks_mod: callbacks_mod_exit\n");
	fflush(stdout);
}

__attribute__((noinline, noipa)) const char *plugin_hello(void)
{
	return "hello from the plugin";
}
