/*
 * fusecsi pause: the process that holds a pod sandbox's namespaces.
 *
 * It is PID 1 of the pod's PID namespace when the namespace is shared, so it reaps orphans
 * (SIGCHLD), and it exits cleanly on SIGINT/SIGTERM so the runtime can stop the sandbox
 * without escalating to SIGKILL. Built with `gcc -static` by e2e/cluster/images.sh.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int signo)
{
	(void)signo;
	_exit(0);
}

static void on_child(int signo)
{
	int saved_errno = errno;

	(void)signo;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	errno = saved_errno;
}

static int install(int signo, void (*handler)(int))
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = handler;
	sa.sa_flags = SA_RESTART | (signo == SIGCHLD ? SA_NOCLDSTOP : 0);
	sigemptyset(&sa.sa_mask);
	return sigaction(signo, &sa, NULL);
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "-v") == 0) {
		puts("fusecsi-pause");
		return 0;
	}
	if (getpid() != 1)
		fprintf(stderr, "pause: warning: not running as PID 1\n");
	if (install(SIGINT, on_stop) || install(SIGTERM, on_stop) || install(SIGCHLD, on_child)) {
		perror("pause: sigaction");
		return 1;
	}
	for (;;)
		pause();
}
