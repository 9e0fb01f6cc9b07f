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
#include "launcher.h"

static int status_fd = -1; /* dockerd's status pipe, until the status is sent */
ino_t server_inode; /* the socket file of the server last connected to */
char python[PATH_MAX];

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
void fail(const char *format, ...)
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

long now_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec * 1000L + now.tv_nsec / 1000000L;
}

/* poll(2) one fd for POLLIN up to timeout_ms; 1 ready, 0 timed out. */
int wait_readable(int fd, long timeout_ms)
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

void unblock_all_signals(void)
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


/* 64-bit FNV-1a, to name the server after its interpreter. */static int bind_listener(const struct options *options)
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

/* Seconds without a connection or flow after which a woken proxy goes back to sleep
 * (proxy/rest.py): $PYENGINE_PROXY_REST_AFTER, 0 for never; 60 by default. */static void relay_status(int status_read, pid_t pid)
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

struct proxy {
    pid_t pid;
    int pidfd;
    int code;   /* its exit code once it said it, else -1 */
    int signal; /* the last signal forwarded to it, else 0 */
};

/* One message of the proxy on the lifeline: {"exited":C} as it exits, or {"handover":P} when a
 * resting proxy has handed its listeners to a new one, P (proxy/rest.py): follow P from now on,
 * and give it the stop signal the old one may have had. */
static void take_message(struct proxy *proxy, const char *text)
{
    const char *field;
    int value;
    if ((field = strstr(text, "\"exited\":")) && sscanf(field + 9, "%d", &value) == 1) {
        proxy->code = value;
    } else if ((field = strstr(text, "\"handover\":")) && sscanf(field + 11, "%d", &value) == 1) {
        int pidfd = (int)syscall(SYS_pidfd_open, value, 0);
        if (pidfd < 0)
            return; /* gone already: its exit is not ours to see; the lifeline's end tells */
        close(proxy->pidfd);
        proxy->pidfd = pidfd;
        proxy->pid = value;
        if (proxy->signal)
            syscall(SYS_pidfd_send_signal, pidfd, proxy->signal, NULL, 0);
    }
}

/* Every message waiting on the lifeline; 0 once it reached end of file (no proxy holds it). */
static int drain_lifeline(int lifeline, struct proxy *proxy)
{
    for (;;) {
        char text[64];
        ssize_t n = recv(lifeline, text, sizeof(text) - 1, MSG_DONTWAIT);
        if (n > 0) {
            text[n] = '\0';
            take_message(proxy, text);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        return n < 0 && errno == EAGAIN;
    }
}

/* Wait for the proxy to end, forwarding SIGINT and SIGTERM; its exit code. */
static int wait_proxy(int signals, int lifeline, struct proxy *proxy)
{
    int open_lifeline = 1;
    for (;;) {
        struct pollfd watched[3] = {
            {.fd = signals, .events = POLLIN},
            {.fd = open_lifeline ? lifeline : -1, .events = POLLIN},
            {.fd = proxy->pidfd, .events = POLLIN},
        };
        if (poll(watched, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail("poll: %s", strerror(errno));
        }
        if (watched[0].revents) {
            struct signalfd_siginfo info;
            if (read(signals, &info, sizeof(info)) == sizeof(info)) {
                proxy->signal = (int)info.ssi_signo;
                syscall(SYS_pidfd_send_signal, proxy->pidfd, proxy->signal, NULL, 0);
            }
        }
        int polled = proxy->pidfd;
        if (watched[1].revents && !drain_lifeline(lifeline, proxy))
            open_lifeline = 0; /* every proxy end is closed: the last one is exiting */
        if (watched[2].revents) {
            /* A proxy writes its message before it exits: read it before deciding. */
            if (open_lifeline && !drain_lifeline(lifeline, proxy))
                open_lifeline = 0;
            if (proxy->pidfd != polled)
                continue; /* it handed over: follow the new one */
            if (proxy->code < 0) {
                fprintf(stderr, "pyengine-docker-proxy: proxy pid %d ended without an exit status\n",
                        (int)proxy->pid);
                return 1;
            }
            return proxy->code;
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
    /* fd 4 first, before this process opens an fd that could land on it. */
    int listener = LISTEN_FD;
    if (options.use_listen_fd) {
        if (fcntl(LISTEN_FD, F_SETFD, FD_CLOEXEC) < 0)
            fail("-use-listen-fd: fd %d is not open", LISTEN_FD);
    } else {
        listener = bind_listener(&options);
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
        pidfd = request_proxy(server, &paths, &options, argc, argv, listener, status[1], &pid);
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
    struct proxy proxy = {.pid = pid, .pidfd = pidfd, .code = -1, .signal = 0};
    return wait_proxy(signals, server, &proxy);
}
