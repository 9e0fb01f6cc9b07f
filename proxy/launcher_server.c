/* pyengine-docker-proxy's way to the host server (proxy/hostserver.py): where its socket is,
 * starting it when there is none, replacing one that does not answer, and the request for a
 * proxy in the fork server's format (struct request_header of proxy/_forkloop.c, then JSON). */
#define _GNU_SOURCE
#include "launcher.h"

static unsigned long long fnv1a(const char *text)
{
    unsigned long long hash = 14695981039346656037ULL;
    for (const unsigned char *c = (const unsigned char *)text; *c; c++)
        hash = (hash ^ *c) * 1099511628211ULL;
    return hash;
}



void make_paths(struct paths *paths)
{
    uid_t uid = getuid();
    const char *chosen = getenv("PYENGINE_PROXY_RUNTIME_DIR");
    const char *runtime = getenv("XDG_RUNTIME_DIR");
    if (chosen && *chosen)
        snprintf(paths->directory, sizeof(paths->directory), "%s", chosen);
    else if (uid == 0)
        snprintf(paths->directory, sizeof(paths->directory), "/run/pyengine-proxy");
    else if (runtime && *runtime)
        snprintf(paths->directory, sizeof(paths->directory), "%s/pyengine-proxy", runtime);
    else
        snprintf(paths->directory, sizeof(paths->directory), "/tmp/pyengine-proxy-%u",
                 (unsigned)uid);
    if (strlen(paths->directory) > 80)
        fail("the runtime directory %s is too long for a socket path", paths->directory);
    if (mkdir(paths->directory, 0700) < 0 && errno != EEXIST)
        fail("cannot create %s: %s", paths->directory, strerror(errno));
    struct stat info;
    if (lstat(paths->directory, &info) < 0)
        fail("cannot use %s: %s", paths->directory, strerror(errno));
    if (!S_ISDIR(info.st_mode) || info.st_uid != uid || (info.st_mode & 077))
        fail("%s is not a private directory of uid %u (mode 0700)", paths->directory,
             (unsigned)uid);
    unsigned long long hash = fnv1a(python);
    snprintf(paths->socket, sizeof(paths->socket), "%s/server-%016llx.sock", paths->directory,
             hash);
    snprintf(paths->lock, sizeof(paths->lock), "%s/server-%016llx.lock", paths->directory, hash);
    snprintf(paths->log, sizeof(paths->log), "%s/server-%016llx.log", paths->directory, hash);
}

/* A connection to the server, or -1 with errno set. */
static int connect_server(const struct paths *paths)
{
    struct stat before;
    if (lstat(paths->socket, &before) < 0)
        return -1;
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fail("cannot create a socket: %s", strerror(errno));
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    memcpy(address.sun_path, paths->socket, strlen(paths->socket) + 1); /* < 108: make_paths */
    while (connect(fd, (struct sockaddr *)&address, sizeof(address)) < 0) {
        if (errno == EINTR)
            continue;
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    struct ucred peer;
    socklen_t size = sizeof(peer);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &size) < 0 || peer.uid != getuid())
        fail("the proxy server at %s does not run as uid %u", paths->socket,
             (unsigned)getuid());
    server_inode = before.st_ino;
    return fd;
}

/* Under the lock: remove the socket of a server that took a request and did not answer, unless
 * another launcher has replaced that server already; the next reach_server starts a new one.
 * The old server, if it ever wakes, forks a proxy whose lifeline is closed: it exits at once. */
void drop_server(const struct paths *paths, ino_t inode)
{
    int lock = open(paths->lock, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (lock < 0 || flock(lock, LOCK_EX) < 0)
        fail("cannot lock %s: %s", paths->lock, strerror(errno));
    struct stat now;
    if (lstat(paths->socket, &now) == 0 && now.st_ino == inode)
        unlink(paths->socket);
    close(lock);
}

/* Start the server: setsid and a second fork, so that it is nobody's child and in no session;
 * wait for its "0\n" (or its "1\n<why>"). */
static void start_server(const struct paths *paths)
{
    int ready[2];
    if (pipe2(ready, O_CLOEXEC) < 0)
        fail("cannot create a pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0)
        fail("cannot fork: %s", strerror(errno));
    if (pid == 0) {
        setsid();
        if (fork() != 0)
            _exit(0);
        unblock_all_signals();
        signal(SIGPIPE, SIG_DFL);
        int null = open("/dev/null", O_RDWR | O_CLOEXEC);
        int log = open(paths->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
        int write_end = fcntl(ready[1], F_DUPFD_CLOEXEC, 10);
        if (null < 0 || write_end < 0)
            _exit(127);
        dup2(null, 0);
        dup2(null, 1);
        dup2(log >= 0 ? log : null, 2);
        dup2(write_end, 3);
        syscall(SYS_close_range, 4, ~0u, 0);
        char *args[] = {python, "-m", "proxy.hostserver", "--socket", (char *)paths->socket,
                        "--ready-fd", "3", NULL};
        execv(python, args);
        _exit(127);
    }
    close(ready[1]);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        ;
    char answer[512];
    size_t got = 0;
    long deadline = now_ms() + START_TIMEOUT_MS;
    while (got < sizeof(answer) - 1) {
        long left = deadline - now_ms();
        if (left <= 0 || !wait_readable(ready[0], left))
            fail("the proxy server did not start within %d s (log: %s)", START_TIMEOUT_MS / 1000,
                 paths->log);
        ssize_t n = read(ready[0], answer + got, sizeof(answer) - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
        if (got >= 2 && answer[0] == '0')
            break;
    }
    close(ready[0]);
    answer[got] = '\0';
    if (got >= 2 && strncmp(answer, "0\n", 2) == 0)
        return;
    if (got >= 2 && answer[0] == '1')
        fail("the proxy server could not start: %s", answer + 2);
    fail("the proxy server exited during start-up (log: %s)", paths->log);
}

/* A connection to a running server, started first under the lock if there is none. */
int reach_server(const struct paths *paths)
{
    int fd = connect_server(paths);
    if (fd >= 0)
        return fd;
    if (errno != ENOENT && errno != ECONNREFUSED)
        fail("cannot reach the proxy server at %s: %s", paths->socket, strerror(errno));
    int lock = open(paths->lock, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (lock < 0)
        fail("cannot open %s: %s", paths->lock, strerror(errno));
    long deadline = now_ms() + LOCK_TIMEOUT_MS;
    while (flock(lock, LOCK_EX | LOCK_NB) < 0) {
        if (errno != EWOULDBLOCK && errno != EINTR)
            fail("cannot lock %s: %s", paths->lock, strerror(errno));
        if (now_ms() > deadline)
            fail("%s stayed locked for %d s", paths->lock, LOCK_TIMEOUT_MS / 1000);
        struct timespec pause = {.tv_nsec = 5 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    fd = connect_server(paths); /* another launcher may have started it meanwhile */
    if (fd < 0) {
        unlink(paths->socket); /* a dead server's */
        start_server(paths);
        fd = connect_server(paths);
        if (fd < 0)
            fail("cannot reach the proxy server at %s: %s", paths->socket, strerror(errno));
    }
    close(lock);
    return fd;
}

/* The listener docker-proxy would bind (proxy/listener.py does the same). */static long rest_after(void)
{
    const char *text = getenv("PYENGINE_PROXY_REST_AFTER");
    if (text == NULL || *text == '\0' || strlen(text) > 6 || strspn(text, "0123456789") != strlen(text))
        return 60;
    return strtol(text, NULL, 10);
}

/* Append text to buffer as a JSON string. */
static size_t json_string(char *buffer, size_t at, size_t size, const char *text)
{
    if (at < size)
        buffer[at] = '"';
    at++;
    for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
        char piece[8];
        if (*c == '"' || *c == '\\')
            snprintf(piece, sizeof(piece), "\\%c", *c);
        else if (*c < 0x20)
            snprintf(piece, sizeof(piece), "\\u%04x", *c);
        else
            snprintf(piece, sizeof(piece), "%c", *c);
        for (char *p = piece; *p; p++, at++)
            if (at < size)
                buffer[at] = *p;
    }
    if (at < size)
        buffer[at] = '"';
    return at + 1;
}

/* Send the request; the server's reply: the proxy's pid and pidfd, or -1 if the server went
 * away without answering (an idle server exiting as it was reached), -2 if it did not answer
 * in time. */
int request_proxy(int server, const struct paths *paths, const struct options *options,
                         int argc, char **argv, int listener, int status_write, pid_t *pid)
{
    char message[8192];
    struct request_header header = {
        .magic = HEADER_MAGIC,
        .id = 1,
        .flags = FLAG_OUTLIVE_PARENT | FLAG_IDLE_HERE |
                 (strcmp(options->proto, "udp") == 0 ? FLAG_UDP : 0),
        .fd_count = 2,
        .targets = {STATUS_FD, LISTEN_FD},
    };
    memcpy(message, &header, sizeof(header));
    size_t at = sizeof(header);
    size_t size = sizeof(message);
    at += (size_t)snprintf(message + at, size - at, "{\"outlive_parent\":true,\"rest_after\":%ld,",
                           rest_after());
    at = json_string(message, at, size, "server");
    at += (size_t)snprintf(message + at, at < size ? size - at : 0, ":");
    at = json_string(message, at, size, paths->socket);
    at += (size_t)snprintf(message + at, at < size ? size - at : 0, ",\"argv\":[");
    for (int i = 1; i < argc; i++) {
        at = json_string(message, at, size, argv[i]);
        if (at < size)
            message[at] = ',';
        at++;
    }
    if (!options->use_listen_fd)
        at = json_string(message, at, size, "-use-listen-fd") + 1;
    if (at + 2 > size)
        fail("the command line is too long");
    at--; /* the last comma */
    message[at++] = ']';
    message[at++] = '}';
    int fds[2] = {status_write, listener};
    union {
        struct cmsghdr header;
        char space[CMSG_SPACE(sizeof(fds))];
    } control;
    memset(&control, 0, sizeof(control));
    struct iovec iov = {.iov_base = message, .iov_len = at};
    struct msghdr request = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                             .msg_controllen = sizeof(control.space)};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&request);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(fds));
    memcpy(CMSG_DATA(cmsg), fds, sizeof(fds));
    while (sendmsg(server, &request, MSG_NOSIGNAL) < 0) {
        if (errno == EINTR)
            continue;
        if (errno == EPIPE || errno == ECONNRESET)
            return -1;
        fail("cannot reach the proxy server: %s", strerror(errno));
    }
    if (!wait_readable(server, REPLY_TIMEOUT_MS))
        return -2;
    char reply[512];
    union {
        struct cmsghdr header;
        char space[CMSG_SPACE(sizeof(int))];
    } received;
    iov = (struct iovec){.iov_base = reply, .iov_len = sizeof(reply) - 1};
    struct msghdr answer = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = received.space,
                            .msg_controllen = sizeof(received.space)};
    ssize_t n;
    while ((n = recvmsg(server, &answer, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR)
        ;
    if (n <= 0)
        return -1;
    reply[n] = '\0';
    int pidfd = -1;
    cmsg = CMSG_FIRSTHDR(&answer);
    if (cmsg && cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS)
        memcpy(&pidfd, CMSG_DATA(cmsg), sizeof(int));
    char *error = strstr(reply, "\"error\":\"");
    if (error) {
        error += 9;
        error[strcspn(error, "\"")] = '\0';
        fail("the proxy server could not start a proxy: %s", error);
    }
    int value;
    char *field = strstr(reply, "\"pid\":");
    if (pidfd < 0 || field == NULL || sscanf(field + 6, "%d", &value) != 1)
        fail("the proxy server answered without a pid and its pidfd");
    *pid = value;
    return pidfd;
}

/* The proxy's start-up status from our pipe, relayed to dockerd's fd 3. */