/* The fork server's request loop, and a forked proxy's idle phase, without the interpreter.
 *
 * A forked proxy shares its memory with the fork server page by page until one of the two
 * writes to a page. Python code writes everywhere it looks (reference counts, bytecode
 * counters, the allocator's free lists), so a Python request loop in the server, or Python in a
 * proxy before its first traffic, would give every idle proxy a private copy of most pages the
 * interpreter touches (~1.5 MB measured). Here the server's loop and a proxy's wait for its
 * first traffic are plain C: they write to their own stack and to nothing the interpreter owns,
 * and an idle proxy stays a shared copy of the server.
 *
 * serve(control_fd) runs the loop (proxy/forkserver.py documents the protocol) and returns None
 * in the server when the supervisor closes its end. In a forked proxy it returns
 * (payload, ready): the request's JSON payload, and whether this code made the listener (fd 4,
 * and fd 5 for a proxy of both families of a port) ready, reported "0\n" on fd 3 and waited
 * until a listener turned readable (the proxy then serves;
 * SIGINT and SIGTERM are still blocked, for the proxy to unblock once it handles them). With
 * ready False, nothing was reported and the proxy starts the ordinary way (and reports errors).
 *
 * Only for a single-threaded process that holds no lock but the GIL: the child of fork(2)
 * resumes holding it, as the parent did.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <time.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "forkproto.h"

#define MAX_MESSAGE (64 * 1024)
#define FIRST_FREE_FD 7
#define MAX_PENDING 64 /* host server: accepted connections awaiting their request */
#define PENDING_TIMEOUT_MS 5000

static char request_buffer[MAX_MESSAGE];

static void close_fds(const int *fds, int count)
{
    for (int i = 0; i < count; i++)
        close(fds[i]);
}

/* sendmsg(2) one text message, with at most one fd as SCM_RIGHTS (unix(7)). */
static void send_message(int control, const char *text, int fd)
{
    struct iovec iov = {.iov_base = (void *)text, .iov_len = strlen(text)};
    union {
        struct cmsghdr header;
        char space[CMSG_SPACE(sizeof(int))];
    } control_data;
    struct msghdr message = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(&control_data, 0, sizeof(control_data));
        message.msg_control = control_data.space;
        message.msg_controllen = sizeof(control_data.space);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    }
    while (sendmsg(control, &message, MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
}

static void send_error(int control, uint32_t id, int has_id, const char *what, int err)
{
    char text[256];
    if (has_id)
        snprintf(text, sizeof(text), "{\"id\":%u,\"error\":\"%s: %s\"}", id, what, strerror(err));
    else
        snprintf(text, sizeof(text), "{\"id\":null,\"error\":\"%s\"}", what);
    send_message(control, text, -1);
}

static void report_exits(int control)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
        char text[64];
        snprintf(text, sizeof(text), "{\"exited\":%d,\"code\":%d}", (int)pid, code);
        send_message(control, text, -1);
    }
}

/* Give fds[i] the number targets[i] (3, 4 or 5) and close every other fd above 2. */
static int place_fds(const int *fds, const uint8_t *targets, int count)
{
    int staged[MAX_FDS];
    for (int i = 0; i < count; i++) {
        /* A received fd at 3, 4 or 5 is moved out of the way first, so that placing one never
         * closes another. */
        staged[i] = fds[i] >= FIRST_FREE_FD ? fds[i] : fcntl(fds[i], F_DUPFD, FIRST_FREE_FD);
        if (staged[i] < 0)
            return -1;
    }
    int placed[FIRST_FREE_FD] = {0};
    for (int i = 0; i < count; i++) {
        if (dup2(staged[i], targets[i]) < 0)
            return -1;
        placed[targets[i]] = 1;
    }
    for (int fd = STATUS_FD; fd < FIRST_FREE_FD; fd++)
        if (!placed[fd])
            close(fd); /* a proxy must not mistake a stray fd 3, 4 or 5 for its parent's */
    if (syscall(SYS_close_range, FIRST_FREE_FD, ~0u, 0) < 0) {
        long max = sysconf(_SC_OPEN_MAX);
        for (long fd = FIRST_FREE_FD; fd < max; fd++)
            close((int)fd);
    }
    return 0;
}

static int is_wildcard(int fd)
{
    struct sockaddr_storage address;
    socklen_t length = sizeof(address);
    if (getsockname(fd, (struct sockaddr *)&address, &length) < 0)
        return -1;
    if (address.ss_family == AF_INET)
        return ((struct sockaddr_in *)&address)->sin_addr.s_addr == htonl(INADDR_ANY);
    if (address.ss_family == AF_INET6)
        return IN6_IS_ADDR_UNSPECIFIED(&((struct sockaddr_in6 *)&address)->sin6_addr);
    return -1;
}

/* What proxy/listener.py and proxy/udp.py do to an adopted listener; -1 if anything is off,
 * and the proxy's own start-up then finds and reports it. */
static int prepare_listener(int fd, int udp)
{
    int type, family;
    socklen_t length = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) < 0)
        return -1;
    length = sizeof(family);
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &length) < 0)
        return -1;
    if ((family != AF_INET && family != AF_INET6) || type != (udp ? SOCK_DGRAM : SOCK_STREAM))
        return -1;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return -1;
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
        return -1;
    if (!udp)
        return listen(fd, SOMAXCONN);
    int wildcard = is_wildcard(fd);
    if (wildcard <= 0)
        return wildcard;
    /* ip(7) IP_PKTINFO, ipv6(7) IPV6_RECVPKTINFO: set before the first datagram is queued. */
    int on = 1;
    if (family == AF_INET)
        return setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &on, sizeof(on));
    return setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &on, sizeof(on));
}

static int report_ready(void)
{
    const char ready[] = "0\n";
    ssize_t written;
    do
        written = write(STATUS_FD, ready, 2);
    while (written < 0 && errno == EINTR);
    close(STATUS_FD);
    return written == 2 ? 0 : -1;
}

/* A host server's proxy tells its launcher how it ended, on the lifeline, just before it
 * exits: the launcher is not its parent and cannot wait(2) for it. */
static void report_exit_on_lifeline(int code)
{
    char text[32];
    snprintf(text, sizeof(text), "{\"exited\":%d}", code);
    while (send(LIFELINE_FD, text, strlen(text), MSG_NOSIGNAL | MSG_DONTWAIT) < 0 && errno == EINTR)
        ;
}

static void exit_proxy(int lifeline, int code)
{
    if (lifeline)
        report_exit_on_lifeline(code);
    _exit(code);
}

/* Block in poll(2) until a listener is readable (returns 0) or SIGINT/SIGTERM arrives (the
 * proxy exits 0, closing its listeners, as docker-proxy does). With a lifeline, its launcher
 * going away (EOF on the connection) stops the proxy too. */
static int wait_for_traffic(int listeners, int lifeline)
{
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    int stop_fd = signalfd(-1, &stop, SFD_CLOEXEC);
    if (stop_fd < 0)
        return -1;
    struct pollfd watched[4] = {
        {.fd = stop_fd, .events = POLLIN},
        {.fd = lifeline ? LIFELINE_FD : -1, .events = POLLIN},
        {.fd = LISTEN_FD, .events = POLLIN},
        {.fd = listeners > 1 ? SECOND_LISTEN_FD : -1, .events = POLLIN},
    };
    for (;;) {
        if (poll(watched, 4, -1) < 0) {
            if (errno == EINTR)
                continue;
            close(stop_fd);
            return -1;
        }
        if (watched[0].revents)
            exit_proxy(lifeline, 0);
        if (watched[1].revents)
            _exit(0); /* the launcher has gone: nobody is left to tell */
        if (watched[2].revents || watched[3].revents) {
            close(stop_fd);
            return 0;
        }
    }
}

/* In the new child: become the proxy the request describes; returns (payload, ready). */
static PyObject *become_proxy(const struct request_header *header, const char *payload,
                              size_t payload_length, const int *fds, pid_t server)
{
    int ready = 0;
    setpgid(0, 0); /* a process group of its own, like a posix_spawn(setpgroup=0) proxy */
    /* prctl(2): PR_SET_PDEATHSIG is cleared by fork(2) in the child already; a server that
     * died before this call sends nothing, so check that it is still the parent. */
    if (!(header->flags & FLAG_OUTLIVE_PARENT)) {
        prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0);
        if (getppid() != server)
            _exit(0);
    }
    prctl(PR_SET_NAME, "pyengine-proxy", 0, 0, 0);
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGCHLD);
    sigprocmask(SIG_UNBLOCK, &signals, NULL); /* blocked in the server, for its signalfd */
    if (place_fds(fds, header->targets, header->fd_count) < 0)
        _exit(1);
    if (header->flags & FLAG_IDLE_HERE) {
        sigemptyset(&signals);
        sigaddset(&signals, SIGINT);
        sigaddset(&signals, SIGTERM);
        sigprocmask(SIG_BLOCK, &signals, NULL);
        int udp = header->flags & FLAG_UDP;
        int listeners = header->flags & FLAG_SECOND_LISTENER ? 2 : 1;
        if (prepare_listener(LISTEN_FD, udp) == 0 &&
            (listeners == 1 || prepare_listener(SECOND_LISTEN_FD, udp) == 0)) {
            int lifeline = (header->flags & FLAG_LIFELINE) != 0;
            if (report_ready() < 0)
                exit_proxy(lifeline, 1); /* the parent went away before the proxy was ready */
            if (wait_for_traffic(listeners, lifeline) == 0)
                ready = 1;
            else
                exit_proxy(lifeline, 1); /* reported ready, cannot go on: as a failed proxy */
        } else {
            sigprocmask(SIG_UNBLOCK, &signals, NULL);
        }
    }
    return Py_BuildValue("(y#O)", payload, (Py_ssize_t)payload_length,
                         ready ? Py_True : Py_False);
}

/* One request: returns NULL in the server (go on), the child's result in the child. A host
 * server passes the connection the request came on as ``control``, with ``lifeline`` set: it
 * becomes the proxy's fd 6, and the proxy outlives the server. */
static PyObject *handle_request(int control, ssize_t length, struct msghdr *message,
                                int lifeline)
{
    int fds[MAX_FDS];
    int fd_count = 0;
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(message); cmsg != NULL;
         cmsg = CMSG_NXTHDR(message, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS)
            continue;
        int count = (int)((cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count && fd_count < MAX_FDS; i++)
            memcpy(&fds[fd_count++], CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
    }
    struct request_header header;
    if ((size_t)length < sizeof(header) || (message->msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
        close_fds(fds, fd_count);
        send_error(control, 0, 0, "malformed request", 0);
        return NULL;
    }
    memcpy(&header, request_buffer, sizeof(header));
    int valid = header.magic == HEADER_MAGIC && header.fd_count == fd_count;
    int seen[FIRST_FREE_FD + 1] = {0};
    for (int i = 0; valid && i < fd_count; i++) {
        uint8_t target = header.targets[i];
        /* fd 6 only to a host server: a resting proxy hands its lifeline on (proxy/rest.py) */
        valid = target >= STATUS_FD && target <= (lifeline ? LIFELINE_FD : SECOND_LISTEN_FD) &&
                !seen[target];
        if (valid)
            seen[target] = 1;
    }
    if (!valid) {
        close_fds(fds, fd_count);
        send_error(control, header.id, 1, "bad request", EINVAL);
        return NULL;
    }
    int received = fd_count;
    if (lifeline) {
        header.flags |= FLAG_OUTLIVE_PARENT | FLAG_LIFELINE;
        if (!seen[LIFELINE_FD]) { /* else the request brought its own */
            fds[fd_count] = control;
            header.targets[fd_count++] = LIFELINE_FD;
        }
    } else {
        header.flags &= ~FLAG_LIFELINE;
    }
    pid_t server = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        header.fd_count = (uint8_t)fd_count;
        return become_proxy(&header, request_buffer + sizeof(header),
                            (size_t)length - sizeof(header), fds, server);
    }
    close_fds(fds, received);
    if (pid < 0) {
        send_error(control, header.id, 1, "fork", errno);
        return NULL;
    }
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) {
        int err = errno;
        kill(pid, SIGKILL); /* reaped, and reported as exited, by the loop */
        send_error(control, header.id, 1, "pidfd_open", err);
        return NULL;
    }
    char text[64];
    snprintf(text, sizeof(text), "{\"id\":%u,\"pid\":%d}", header.id, (int)pid);
    send_message(control, text, pidfd);
    close(pidfd);
    return NULL;
}

/* recvmsg(2) one request into request_buffer, its fds received close-on-exec into
 * request_fds (which ``message`` points at until the next call). */
static ssize_t receive_request(int fd, struct msghdr *message, struct iovec *iov, int flags)
{
    static union {
        struct cmsghdr header;
        char space[CMSG_SPACE(MAX_FDS * sizeof(int))];
    } request_fds;
    iov->iov_base = request_buffer;
    iov->iov_len = sizeof(request_buffer);
    memset(message, 0, sizeof(*message));
    message->msg_iov = iov;
    message->msg_iovlen = 1;
    message->msg_control = request_fds.space;
    message->msg_controllen = sizeof(request_fds.space);
    return recvmsg(fd, message, MSG_CMSG_CLOEXEC | flags);
}

/* SIGCHLD blocked and delivered to a signalfd, for the loop to reap its children; -1 (with a
 * Python error set) if that fails. */
static int watch_child_exits(void)
{
    sigset_t child_signal;
    sigemptyset(&child_signal);
    sigaddset(&child_signal, SIGCHLD);
    int exits = -1;
    if (sigprocmask(SIG_BLOCK, &child_signal, NULL) == 0)
        exits = signalfd(-1, &child_signal, SFD_NONBLOCK | SFD_CLOEXEC);
    if (exits < 0)
        PyErr_SetFromErrno(PyExc_OSError);
    return exits;
}

static PyObject *forkloop_serve(PyObject *module, PyObject *args)
{
    int control;
    if (!PyArg_ParseTuple(args, "i", &control))
        return NULL;
    int exits = watch_child_exits();
    if (exits < 0)
        return NULL;
    struct pollfd watched[2] = {
        {.fd = control, .events = POLLIN},
        {.fd = exits, .events = POLLIN},
    };
    for (;;) {
        if (poll(watched, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (watched[1].revents) {
            struct signalfd_siginfo info;
            while (read(exits, &info, sizeof(info)) == sizeof(info))
                ;
            report_exits(control);
        }
        if (watched[0].revents) {
            struct iovec iov;
            struct msghdr message;
            ssize_t length = receive_request(control, &message, &iov, 0);
            if (length < 0 && errno == EINTR)
                continue;
            if (length <= 0)
                break; /* the supervisor has gone */
            PyObject *in_child = handle_request(control, length, &message, 0);
            if (in_child != NULL)
                return in_child; /* its fds, this loop's among them, are closed or replaced */
        }
    }
    close(exits);
    Py_RETURN_NONE;
}

static long now_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec * 1000L + now.tv_nsec / 1000000L;
}

/* A host server: launchers (proxy/launcher.c) connect to ``listener``, each sends one request
 * and gets the reply; the connection then belongs to the forked proxy alone (its lifeline). Only
 * connections from this process's own uid are served (unix(7) SO_PEERCRED). Returns None once
 * no proxy of this server has been running and nothing has been asked for ``idle_seconds``. */
static PyObject *forkloop_serve_host(PyObject *module, PyObject *args)
{
    int listener, idle_seconds;
    if (!PyArg_ParseTuple(args, "ii", &listener, &idle_seconds))
        return NULL;
    int exits = watch_child_exits();
    if (exits < 0)
        return NULL;
    struct pollfd watched[2 + MAX_PENDING];
    long accepted_at[MAX_PENDING];
    int pending = 0;
    long children = 0;
    long last_activity = now_ms();
    uid_t uid = getuid();
    for (;;) {
        watched[0] = (struct pollfd){.fd = exits, .events = POLLIN};
        watched[1] = (struct pollfd){.fd = listener, .events = POLLIN};
        long now = now_ms();
        long timeout = -1;
        if (pending > 0) {
            timeout = accepted_at[0] + PENDING_TIMEOUT_MS - now;
            if (timeout < 0)
                timeout = 0;
        } else if (children == 0 && idle_seconds > 0) {
            timeout = last_activity + idle_seconds * 1000L - now;
            if (timeout <= 0)
                break; /* idle: the next launcher starts a new server */
        }
        if (poll(watched, (nfds_t)(2 + pending), timeout > INT_MAX ? INT_MAX : (int)timeout) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        now = now_ms();
        if (watched[0].revents) {
            struct signalfd_siginfo info;
            while (read(exits, &info, sizeof(info)) == sizeof(info))
                ;
            int status;
            while (waitpid(-1, &status, WNOHANG) > 0)
                children--;
            if (children <= 0) {
                children = 0;
                last_activity = now;
            }
        }
        /* Pending connections first, oldest first: each is served or dropped, then removed. */
        int kept = 0;
        for (int i = 0; i < pending; i++) {
            int conn = watched[2 + i].fd;
            int done = 0;
            if (watched[2 + i].revents) {
                struct iovec iov;
                struct msghdr message;
                ssize_t length = receive_request(conn, &message, &iov, MSG_DONTWAIT);
                if (length < 0 && (errno == EAGAIN || errno == EINTR)) {
                    done = 0;
                } else if (length <= 0) {
                    done = 1;
                } else {
                    PyObject *in_child = handle_request(conn, length, &message, 1);
                    if (in_child != NULL)
                        return in_child; /* the proxy: fds placed, the server's closed */
                    children++;
                    last_activity = now;
                    done = 1;
                }
            } else if (now - accepted_at[i] >= PENDING_TIMEOUT_MS) {
                done = 1;
            }
            if (done) {
                close(conn);
            } else {
                watched[2 + kept] = watched[2 + i];
                accepted_at[kept++] = accepted_at[i];
            }
        }
        pending = kept;
        if (watched[1].revents) {
            int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
            if (conn >= 0) {
                struct ucred peer;
                socklen_t size = sizeof(peer);
                if (pending == MAX_PENDING ||
                    getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &peer, &size) < 0 ||
                    peer.uid != uid) {
                    close(conn);
                } else {
                    watched[2 + pending] = (struct pollfd){.fd = conn, .events = POLLIN};
                    accepted_at[pending++] = now;
                    last_activity = now;
                }
            }
        }
    }
    close(exits);
    Py_RETURN_NONE;
}

static PyMethodDef forkloop_methods[] = {
    {"serve", forkloop_serve, METH_VARARGS,
     "serve(control_fd) -> None in the server, (payload, ready) in a forked proxy."},
    {"serve_host", forkloop_serve_host, METH_VARARGS,
     "serve_host(listen_fd, idle_seconds) -> None in the server once idle, (payload, ready) in "
     "a forked proxy."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef forkloop_module = {
    PyModuleDef_HEAD_INIT, "proxy._forkloop", NULL, -1, forkloop_methods,
};

PyMODINIT_FUNC PyInit__forkloop(void)
{
    PyObject *module = PyModule_Create(&forkloop_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "HEADER_MAGIC", HEADER_MAGIC) < 0 ||
        PyModule_AddIntConstant(module, "MAX_FDS", MAX_FDS) < 0 ||
        PyModule_AddIntConstant(module, "FLAG_OUTLIVE_PARENT", FLAG_OUTLIVE_PARENT) < 0 ||
        PyModule_AddIntConstant(module, "FLAG_IDLE_HERE", FLAG_IDLE_HERE) < 0 ||
        PyModule_AddIntConstant(module, "FLAG_UDP", FLAG_UDP) < 0 ||
        PyModule_AddIntConstant(module, "FLAG_SECOND_LISTENER", FLAG_SECOND_LISTENER) < 0 ||
        PyModule_AddIntConstant(module, "LIFELINE_FD", LIFELINE_FD) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
