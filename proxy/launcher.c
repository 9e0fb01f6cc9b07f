/* pyengine-docker-proxy: docker-proxy's command line, served by the host's shared fork server.
 *
 * dockerd execs its userland proxy once per published port and family, passes the write end of
 * a status pipe as fd 3 (and, from Docker 28 on, the listening socket as fd 4 with
 * -use-listen-fd), waits for "0\n" or "1\n<error>", and later stops the process with SIGINT or
 * SIGTERM and waits for it. This program is that process, at a few pages of memory: it binds the
 * listener itself when dockerd did not (as docker-proxy does), hands the listener and a status
 * pipe to the host server (proxy/hostserver.py; started here when there is none), which forks
 * the proxy; it relays the proxy's status to fd 3, forwards SIGINT and SIGTERM to it, and exits
 * with the proxy's exit code. The proxy stops when this process dies (its lifeline, the
 * connection to the server, reaches end of file).
 *
 * A command line other than docker-proxy's five flags and -use-listen-fd (-h, -v, pyengine's own
 * flags, anything this parser does not take) is exec'd as the Python pyengine-proxy instead, which
 * handles and reports it.
 *
 * The Python interpreter is $PYENGINE_PROXY_PYTHON, else the one named by the pyengine-proxy
 * script beside this program, else python3 beside it. The server's socket is
 * <dir>/server-<hash of the interpreter's path>.sock, <dir> being $PYENGINE_PROXY_RUNTIME_DIR,
 * /run/pyengine-proxy for root, $XDG_RUNTIME_DIR/pyengine-proxy or /tmp/pyengine-proxy-<uid>;
 * the directory must be this uid's, mode 0700, and so must the server be (SO_PEERCRED).
 */
#define _GNU_SOURCE
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

#define STATUS_FD 3
#define LISTEN_FD 4
/* struct request_header and the flags of proxy/_forkloop.c */
#define HEADER_MAGIC 0x50594631u
#define MAX_FDS 8
#define FLAG_OUTLIVE_PARENT 1u
#define FLAG_IDLE_HERE 2u
#define FLAG_UDP 4u
#define START_TIMEOUT_MS 30000 /* a cold server imports and warms up in ~1 s */
#define REPLY_TIMEOUT_MS 5000 /* a warm server forks in milliseconds; after this it is replaced */
#define STATUS_TIMEOUT_MS 15000 /* dockerd gives its proxy 16 s */
#define LOCK_TIMEOUT_MS 40000

struct request_header {
    uint32_t magic;
    uint32_t id;
    uint32_t flags;
    uint8_t fd_count;
    uint8_t targets[MAX_FDS];
    uint8_t padding[3];
};

struct options {
    const char *proto, *host_ip, *host_port, *container_ip, *container_port;
    int use_listen_fd;
};

static int status_fd = -1; /* dockerd's status pipe, until the status is sent */
static ino_t server_inode; /* the socket file of the server last connected to */
static char python[PATH_MAX];

static void report(const char *status, size_t length)
{
    if (status_fd < 0)
        return;
    while (length > 0) {
        ssize_t written = write(status_fd, status, length);
        if (written < 0 && errno == EINTR)
            continue;
        if (written <= 0)
            break;
        status += written;
        length -= (size_t)written;
    }
    close(status_fd);
    status_fd = -1;
}

/* Fail before a proxy runs: "1\n<why>" on fd 3, as docker-proxy reports, and exit 1. */
static void fail(const char *format, ...)
{
    char text[1024] = "1\n";
    va_list args;
    va_start(args, format);
    vsnprintf(text + 2, sizeof(text) - 2, format, args);
    va_end(args);
    for (char *c = text + 2; *c; c++)
        if (*c == '\n')
            *c = ' '; /* one line */
    report(text, strlen(text));
    fprintf(stderr, "pyengine-docker-proxy: %s\n", text + 2);
    exit(1);
}

static long now_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec * 1000L + now.tv_nsec / 1000000L;
}

/* poll(2) one fd for POLLIN up to timeout_ms; 1 ready, 0 timed out. */
static int wait_readable(int fd, long timeout_ms)
{
    long deadline = now_ms() + timeout_ms;
    for (;;) {
        long left = deadline - now_ms();
        struct pollfd watched = {.fd = fd, .events = POLLIN};
        int n = poll(&watched, 1, left > 0 ? (int)left : 0);
        if (n > 0)
            return 1;
        if (n == 0)
            return 0;
        if (errno != EINTR)
            return 1; /* let the read report it */
    }
}

static int is_true(const char *word)
{
    const char *yes[] = {"1", "t", "T", "true", "TRUE", "True"};
    for (size_t i = 0; i < sizeof(yes) / sizeof(*yes); i++)
        if (strcmp(word, yes[i]) == 0)
            return 1;
    return 0;
}

static int is_false(const char *word)
{
    const char *no[] = {"0", "f", "F", "false", "FALSE", "False"};
    for (size_t i = 0; i < sizeof(no) / sizeof(*no); i++)
        if (strcmp(word, no[i]) == 0)
            return 1;
    return 0;
}

static int valid_ip(const char *text)
{
    unsigned char address[16];
    return inet_pton(AF_INET, text, address) == 1 || inet_pton(AF_INET6, text, address) == 1;
}

static int valid_port(const char *text)
{
    if (text == NULL || *text == '\0' || strlen(text) > 5)
        return 0;
    for (const char *c = text; *c; c++)
        if (*c < '0' || *c > '9')
            return 0;
    long port = strtol(text, NULL, 10);
    return port >= 1 && port <= 65535;
}

/* docker-proxy's flags in Go's flag syntax (-name value, -name=value, --name); 1 if the command
 * line is exactly those and valid, 0 for anything else. */
static int parse(int argc, char **argv, struct options *options)
{
    memset(options, 0, sizeof(*options));
    for (int i = 1; i < argc; i++) {
        const char *name = argv[i];
        if (name[0] != '-' || name[1] == '\0')
            return 0;
        name += name[1] == '-' ? 2 : 1;
        const char *equals = strchr(name, '=');
        size_t length = equals ? (size_t)(equals - name) : strlen(name);
        if (length == 13 && strncmp(name, "use-listen-fd", 13) == 0) {
            if (equals && !is_true(equals + 1) && !is_false(equals + 1))
                return 0;
            options->use_listen_fd = equals ? is_true(equals + 1) : 1;
            continue;
        }
        const char *value = equals ? equals + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (value == NULL)
            return 0;
        const char **slot = NULL;
        if (length == 5 && strncmp(name, "proto", 5) == 0)
            slot = &options->proto;
        else if (length == 7 && strncmp(name, "host-ip", 7) == 0)
            slot = &options->host_ip;
        else if (length == 9 && strncmp(name, "host-port", 9) == 0)
            slot = &options->host_port;
        else if (length == 12 && strncmp(name, "container-ip", 12) == 0)
            slot = &options->container_ip;
        else if (length == 14 && strncmp(name, "container-port", 14) == 0)
            slot = &options->container_port;
        else
            return 0;
        *slot = value;
    }
    return options->proto && (strcmp(options->proto, "tcp") == 0 ||
                              strcmp(options->proto, "udp") == 0) &&
           options->host_ip && valid_ip(options->host_ip) && options->container_ip &&
           valid_ip(options->container_ip) && valid_port(options->host_port) &&
           valid_port(options->container_port);
}

/* The interpreter: $PYENGINE_PROXY_PYTHON, the pyengine-proxy script's beside this program,
 * or python3 beside it. */
static void find_python(void)
{
    const char *chosen = getenv("PYENGINE_PROXY_PYTHON");
    if (chosen && *chosen) {
        snprintf(python, sizeof(python), "%s", chosen);
        return;
    }
    char self[PATH_MAX - 16];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n <= 0)
        fail("cannot find this program's path: %s", strerror(errno));
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    *slash = '\0';
    char script[PATH_MAX + 32];
    snprintf(script, sizeof(script), "%s/pyengine-proxy", self);
    int fd = open(script, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char line[PATH_MAX];
        ssize_t got = read(fd, line, sizeof(line) - 1);
        close(fd);
        if (got > 2 && line[0] == '#' && line[1] == '!') {
            line[got] = '\0';
            line[strcspn(line, " \t\r\n")] = '\0';
            if (strstr(line + 2, "python") && access(line + 2, X_OK) == 0) {
                snprintf(python, sizeof(python), "%s", line + 2);
                return;
            }
        }
    }
    snprintf(python, sizeof(python), "%s/python3", self);
    if (access(python, X_OK) != 0)
        fail("no Python for the proxy beside %s (set PYENGINE_PROXY_PYTHON)", self);
}

static void unblock_all_signals(void)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Anything but docker-proxy's plain command line: the Python pyengine-proxy, in this process. */
static void exec_python_proxy(int argc, char **argv)
{
    char **args = calloc((size_t)argc + 3, sizeof(char *));
    if (args == NULL)
        fail("out of memory");
    args[0] = python;
    args[1] = "-m";
    args[2] = "proxy.main";
    for (int i = 1; i < argc; i++)
        args[i + 2] = argv[i];
    unblock_all_signals();
    execv(python, args);
    fail("cannot run %s: %s", python, strerror(errno));
}


/* 64-bit FNV-1a, to name the server after its interpreter. */
static unsigned long long fnv1a(const char *text)
{
    unsigned long long hash = 14695981039346656037ULL;
    for (const unsigned char *c = (const unsigned char *)text; *c; c++)
        hash = (hash ^ *c) * 1099511628211ULL;
    return hash;
}

struct paths {
    char directory[128], socket[192], lock[192], log[192];
};

static void make_paths(struct paths *paths)
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
static void drop_server(const struct paths *paths, ino_t inode)
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
static int reach_server(const struct paths *paths)
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

/* The listener docker-proxy would bind (proxy/listener.py does the same). */
static int bind_listener(const struct options *options)
{
    int udp = strcmp(options->proto, "udp") == 0;
    int six = strchr(options->host_ip, ':') != NULL;
    int fd = socket(six ? AF_INET6 : AF_INET, (udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fail("cannot create a socket: %s", strerror(errno));
    int on = 1;
    struct sockaddr_storage address;
    socklen_t length;
    memset(&address, 0, sizeof(address));
    int port = (int)strtol(options->host_port, NULL, 10);
    if (six) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&address;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        inet_pton(AF_INET6, options->host_ip, &in6->sin6_addr);
        length = sizeof(*in6);
        /* ipv6(7) IPV6_V6ONLY: "::" and "0.0.0.0" on one port are two proxies. */
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof(on));
    } else {
        struct sockaddr_in *in4 = (struct sockaddr_in *)&address;
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        inet_pton(AF_INET, options->host_ip, &in4->sin_addr);
        length = sizeof(*in4);
    }
    if (!udp)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
    if (bind(fd, (struct sockaddr *)&address, length) < 0 ||
        (!udp && listen(fd, SOMAXCONN) < 0))
        fail("cannot listen on %s%s%s:%s/%s: %s", six ? "[" : "", options->host_ip,
             six ? "]" : "", options->host_port, options->proto, strerror(errno));
    return fd;
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
static int request_proxy(int server, const struct options *options, int argc, char **argv,
                         int listener, int status_write, pid_t *pid)
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
    at += (size_t)snprintf(message + at, size - at, "{\"outlive_parent\":true,\"argv\":[");
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
static void relay_status(int status_read, pid_t pid)
{
    char status[1024];
    size_t got = 0;
    long deadline = now_ms() + STATUS_TIMEOUT_MS;
    while (got < sizeof(status) - 1) {
        long left = deadline - now_ms();
        if (left <= 0 || !wait_readable(status_read, left)) {
            kill(pid, SIGKILL);
            fail("the proxy did not report start-up within %d s", STATUS_TIMEOUT_MS / 1000);
        }
        ssize_t n = read(status_read, status + got, sizeof(status) - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
        if (got >= 2 && strncmp(status, "0\n", 2) == 0)
            break;
    }
    close(status_read);
    status[got] = '\0';
    if (got >= 2 && strncmp(status, "0\n", 2) == 0) {
        report("0\n", 2);
        return;
    }
    if (got >= 2 && status[0] == '1')
        fail("%s", status + 2);
    fail("the proxy exited during start-up");
}

/* Wait for the proxy to end, forwarding SIGINT and SIGTERM; its exit code. */
static int wait_proxy(int signals, int lifeline, int pidfd, pid_t pid)
{
    int code = -1;
    struct pollfd watched[3] = {
        {.fd = signals, .events = POLLIN},
        {.fd = lifeline, .events = POLLIN},
        {.fd = pidfd, .events = POLLIN},
    };
    for (;;) {
        if (poll(watched, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail("poll: %s", strerror(errno));
        }
        if (watched[0].revents) {
            struct signalfd_siginfo info;
            if (read(signals, &info, sizeof(info)) == sizeof(info))
                syscall(SYS_pidfd_send_signal, pidfd, (int)info.ssi_signo, NULL, 0);
        }
        if (watched[1].revents) {
            char text[64];
            ssize_t n = recv(lifeline, text, sizeof(text) - 1, MSG_DONTWAIT);
            if (n > 0) {
                text[n] = '\0';
                char *field = strstr(text, "\"exited\":");
                if (field)
                    sscanf(field + 9, "%d", &code);
            } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
                watched[1].fd = -1; /* the proxy has closed it: it is exiting */
            }
        }
        if (watched[2].revents) {
            char text[64];
            ssize_t n = recv(lifeline, text, sizeof(text) - 1, MSG_DONTWAIT);
            if (n > 0 && code < 0) {
                text[n] = '\0';
                char *field = strstr(text, "\"exited\":");
                if (field)
                    sscanf(field + 9, "%d", &code);
            }
            if (code < 0) {
                fprintf(stderr, "pyengine-docker-proxy: proxy pid %d ended without an exit status\n",
                        (int)pid);
                return 1;
            }
            return code;
        }
    }
}

int main(int argc, char **argv)
{
    /* First: fd 3 is dockerd's status pipe only if it is open now. */
    if (fcntl(STATUS_FD, F_GETFD) >= 0) {
        status_fd = STATUS_FD;
        fcntl(STATUS_FD, F_SETFD, FD_CLOEXEC);
    }
    find_python();
    struct options options;
    if (!parse(argc, argv, &options)) {
        if (status_fd >= 0)
            fcntl(STATUS_FD, F_SETFD, 0);
        exec_python_proxy(argc, argv);
    }
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    sigprocmask(SIG_BLOCK, &stop, NULL);
    int signals = signalfd(-1, &stop, SFD_CLOEXEC);
    if (signals < 0)
        fail("signalfd: %s", strerror(errno));
    signal(SIGPIPE, SIG_IGN);
    int listener = LISTEN_FD;
    if (options.use_listen_fd) {
        if (fcntl(LISTEN_FD, F_SETFD, FD_CLOEXEC) < 0)
            fail("-use-listen-fd: fd %d is not open", LISTEN_FD);
    } else {
        listener = bind_listener(&options);
    }
    struct paths paths;
    make_paths(&paths);
    int status[2] = {-1, -1};
    pid_t pid = 0;
    int server = -1, pidfd = -1;
    for (int attempt = 0; pidfd < 0; attempt++) {
        if (attempt == 3)
            fail("the proxy server at %s failed %d requests", paths.socket, attempt);
        /* A pipe per attempt: a server that answers late must not report on this one. */
        if (pipe2(status, O_CLOEXEC) < 0)
            fail("cannot create a pipe: %s", strerror(errno));
        server = reach_server(&paths);
        pidfd = request_proxy(server, &options, argc, argv, listener, status[1], &pid);
        close(status[1]);
        if (pidfd < 0) {
            close(server);
            close(status[0]);
        }
        if (pidfd == -2)
            drop_server(&paths, server_inode);
    }
    close(listener);
    relay_status(status[0], pid);
    return wait_proxy(signals, server, pidfd, pid);
}
