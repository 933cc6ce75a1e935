/* The simulated LAN's switch loop in C (llmrpc/bench/lan.py opens the TUN devices and execs
 * this): every IPv4 packet read from a node's device is written to its destination's device
 * after the one-way delay and its serialisation time on the destination's link, in order.
 *
 *   lan_switch DELAY_NS RATE_BPS FD:IP [FD:IP ...]    (IP: the node's IPv4 address as a u32)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_NODES 64
#define QUEUE 4096  /* packets in flight to one node */
#define PACKET 65536

typedef struct { int64_t due; int len; unsigned char *data; } Packet;
typedef struct { int fd; uint32_t ip; int64_t free_at; Packet *q; int head, count; } Node;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s DELAY_NS RATE_BPS FD:IP...\n", argv[0]); return 2; }
    int64_t delay = atoll(argv[1]);
    double ns_per_byte = 8e9 / atof(argv[2]);
    int n = argc - 3;
    if (n > MAX_NODES) { fprintf(stderr, "at most %d nodes\n", MAX_NODES); return 2; }
    Node nodes[MAX_NODES];
    struct pollfd pfd[MAX_NODES];
    for (int i = 0; i < n; i++) {
        unsigned ip;
        if (sscanf(argv[3 + i], "%d:%u", &nodes[i].fd, &ip) != 2) { fprintf(stderr, "bad node %s\n", argv[3 + i]); return 2; }
        nodes[i].ip = ip;
        nodes[i].free_at = 0;
        nodes[i].head = nodes[i].count = 0;
        nodes[i].q = calloc(QUEUE, sizeof(Packet));
        pfd[i].fd = nodes[i].fd;
        pfd[i].events = POLLIN;
    }
    printf("ready\n");
    fflush(stdout);
    unsigned char buf[PACKET];
    for (;;) {
        int64_t next = -1;
        for (int j = 0; j < n; j++)
            if (nodes[j].count && (next < 0 || nodes[j].q[nodes[j].head].due < next)) next = nodes[j].q[nodes[j].head].due;
        struct timespec ts, *wait = NULL;
        if (next >= 0) {
            int64_t w = next - now_ns();
            if (w < 0) w = 0;
            ts.tv_sec = w / 1000000000LL;
            ts.tv_nsec = w % 1000000000LL;
            wait = &ts;
        }
        int ready = ppoll(pfd, n, wait, NULL);
        if (ready < 0 && errno != EINTR) { perror("ppoll"); return 1; }
        int64_t now = now_ns();
        for (int i = 0; ready > 0 && i < n; i++) {
            if (!(pfd[i].revents & POLLIN)) continue;
            for (;;) {
                ssize_t len = read(nodes[i].fd, buf, sizeof buf);
                if (len < 0) break;  /* EAGAIN: all read */
                if (len < 20 || (buf[0] >> 4) != 4) continue;  /* not IPv4 (e.g. IPv6 router solicitations) */
                uint32_t dst;
                memcpy(&dst, buf + 16, 4);
                Node *to = NULL;
                for (int j = 0; j < n; j++) if (nodes[j].ip == dst) to = &nodes[j];
                if (to == NULL || to->count == QUEUE) continue;  /* not a node, or its queue is full: dropped */
                int64_t start = now + delay > to->free_at ? now + delay : to->free_at;
                int64_t due = start + (int64_t)(len * ns_per_byte);
                to->free_at = due;
                Packet *p = &to->q[(to->head + to->count) % QUEUE];
                p->due = due;
                p->len = (int)len;
                p->data = malloc((size_t)len);
                if (p->data == NULL) continue;
                memcpy(p->data, buf, (size_t)len);
                to->count++;
            }
        }
        now = now_ns();
        for (int j = 0; j < n; j++) {
            Node *to = &nodes[j];
            while (to->count && to->q[to->head].due <= now) {
                Packet *p = &to->q[to->head];
                if (write(to->fd, p->data, (size_t)p->len) < 0 && errno == EAGAIN) break;
                free(p->data);
                to->head = (to->head + 1) % QUEUE;
                to->count--;
            }
        }
    }
}
