/* The fork server's request format, shared by its C loop (proxy/_forkloop.c) and the launcher
 * (proxy/launcher.c): this fixed header, then the JSON payload (proxy/forkserver.py
 * documents the protocol and packs the same header as _HEADER). */
#ifndef PYENGINE_FORKPROTO_H
#define PYENGINE_FORKPROTO_H
#include <stdint.h>

#define MAX_FDS 8
#define STATUS_FD 3
#define LISTEN_FD 4
#define SECOND_LISTEN_FD 5
#define LIFELINE_FD 6 /* a host server's proxy: its launcher's connection (proxy/hostserver.py) */
#define HEADER_MAGIC 0x50594631u /* "PYF1" */

#define FLAG_OUTLIVE_PARENT 1u  /* no PR_SET_PDEATHSIG: the proxy outlives the server */
#define FLAG_IDLE_HERE 2u       /* fd 4 is the listener: get it ready and wait here */
#define FLAG_UDP 4u             /* with FLAG_IDLE_HERE: a UDP listener (else TCP) */
#define FLAG_SECOND_LISTENER 8u /* with FLAG_IDLE_HERE: fd 5 is a listener too */
#define FLAG_LIFELINE 16u       /* set by the host server: the request's connection is fd 6 */

/* The fixed part of a request; the JSON payload follows it. */
struct request_header {
    uint32_t magic;
    uint32_t id;
    uint32_t flags;
    uint8_t fd_count;
    uint8_t targets[MAX_FDS];
    uint8_t padding[3];
};

#endif
