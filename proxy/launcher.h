/* The launcher's parts (proxy/launcher.c: the command line and the proxy's lifetime;
 * proxy/launcher_server.c: reaching the host server and asking it for the proxy). */
#ifndef PYENGINE_LAUNCHER_H
#define PYENGINE_LAUNCHER_H
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "forkproto.h"

#define START_TIMEOUT_MS 30000 /* a cold server imports and warms up in ~1 s */
#define REPLY_TIMEOUT_MS 5000 /* a warm server forks in milliseconds; after this it is replaced */
#define STATUS_TIMEOUT_MS 15000 /* dockerd gives its proxy 16 s */
#define LOCK_TIMEOUT_MS 40000

struct options {
    const char *proto, *host_ip, *host_port, *container_ip, *container_port;
    int use_listen_fd;
};

struct paths {
    char directory[128], socket[192], lock[192], log[192];
};

extern char python[PATH_MAX];
extern ino_t server_inode;

void fail(const char *format, ...) __attribute__((noreturn, format(printf, 1, 2)));
long now_ms(void);
int wait_readable(int fd, long timeout_ms);
void unblock_all_signals(void);

void make_paths(struct paths *paths);
int reach_server(const struct paths *paths);
void drop_server(const struct paths *paths, ino_t inode);
int request_proxy(int server, const struct paths *paths, const struct options *options, int argc,
                  char **argv, int listener, int status_write, pid_t *pid);

#endif
