/* A generation's step through a server, in one call: the STEP frame read from its connection,
 * the row's inputs set, the kept one-row graph computed, and the hidden state sent on as the
 * next hop's STEP. At the last server of a greedy generation the graph ends in the argmax: the
 * token is reported to the head (TOKEN) and sent back to the first server as the next step,
 * or, when it ends the generation, left to Python (HOP_ENDED). Built on first use (native.py)
 * and called from the compute loop when a connection that carries a generation's steps
 * becomes readable.
 *
 * The same work in Python runs cold after every stage's compute (the layers' weights have
 * flushed the caches): ~0.6 ms a hop where this takes tens of microseconds. Whatever is not the
 * plain case (another frame, another generation, a position past the graph's attended cells,
 * bad input) is left unread for the Python data plane, which answers it as before.
 *
 * Frame layouts: codec.py (DATA_HEADER "<4sB3xQIQ", STEP_META "<qIiiiBB2xII").
 */
#include <errno.h>
#include <math.h>
#include <semaphore.h>
#include <stdint.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/types.h>

#define HEADER_BYTES 28
#define META_BYTES 36
#define KIND_TOKEN 6
#define KIND_STEP 9
#define TOKEN_BYTES 12
#define CODE_F32 0
#define CODE_I32 2

/* HOP_ENDED: the token (``token``) ends the generation, Python reports it */
enum {
    HOP_DONE = 0, HOP_NOT_MINE = 1, HOP_NOTHING = 2, HOP_ENDED = 3,
    HOP_BROKEN = -1, HOP_COMPUTE_FAILED = -2,
};

typedef struct {
    /* the connection the steps come on, the next server's, this host's compute lock (-1: none) */
    int64_t in_fd, out_fd, lock_fd;
    /* the generation and this server's place on its route */
    int64_t link, rid, hop;
    int64_t first;                 /* 1: the input is a token id (I32 [1]); 0: hidden F32 [1, n_embd] */
    int64_t n_embd, n_vocab, n_embd_kv;
    int64_t length;                /* positions the session holds: the next step's position */
    int64_t limit;                 /* positions the kept graph can take (its attended cells) */
    int64_t n_kv;                  /* cells of the mask row */
    int64_t allowed;               /* mask cells [0, allowed) are 0, the rest -inf */
    int32_t *pos_buf;
    int64_t *k_buf, *v_rows, *v_buf;
    void *mask_buf;                /* F32, or F16 (mask_f16) for flash attention */
    void *sched, *gf, *out, *inp_x, *inp_pos, *inp_k, *inp_v, *inp_mask;
    /* the parked OpenMP team (openmp.py): state[0] parked, state[1] woken; NULL: no team */
    int64_t *team_state;
    void *sem;
    int64_t n_threads;
    void *sem_wait_fn;
    void (*tensor_set)(void *, const void *, size_t, size_t);
    void (*tensor_get)(const void *, void *, size_t, size_t);
    int (*compute)(void *, void *);
    void (*synchronize)(void *);
    void (*gomp_start)(void *, void *, unsigned);
    void (*gomp_end)(void);
    uint8_t *buf;                  /* HEADER_BYTES + META_BYTES + n_embd * 4 bytes */
    /* the last server of a greedy generation: the head's connection, the tokens that end the
     * generation, the positions it may fill (Generation.limit) */
    int64_t last, head_fd, n_eog, gen_limit;
    int32_t *eog;
    /* what the last call did: ``sent`` bytes of the step went to the next server (an error
     * there: ``err``); at the last server, ``reported`` bytes of the token's report went to the
     * head (an error there: ``head_err``), Python sends the rest */
    int64_t pos, step, n, sent, status, err, token;
    int64_t mask_f16;              /* the mask row holds F16 values (0x0000 keep, 0xFC00 -inf) */
    int64_t reported, head_err;
    /* 0: the layers have no full-attention group (pos_buf and inp_pos are still set) */
    int64_t has_full;
    /* a sliding-window group (swa_size 0: none), placed as kv.py's SlidingCells.place places one
     * row: its cells' positions (-1 empty) and search head, shared with Python; scratch: a copy to
     * place in before the step is taken; the graph's attended cells (swa_n_kv) and the pad they
     * are rounded to; the window (standard: a row at p sees p - window < q <= p) */
    int64_t swa_size, swa_window, swa_n_kv, swa_pad, swa_n_v;
    int64_t *swa_pos, *swa_heads, *swa_scratch, *swa_k_buf, *swa_v_rows, *swa_v_buf;
    void *swa_mask_buf, *swa_inp_k, *swa_inp_v, *swa_inp_mask;
} Hop;

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static void put_header(uint8_t *o, uint8_t kind, int64_t rid, uint32_t meta_len, uint64_t data_len) {
    memcpy(o, "LRD1", 4);
    o[4] = kind;
    o[5] = o[6] = o[7] = 0;
    put64(o + 8, (uint64_t)rid);
    put32(o + 16, meta_len);
    put64(o + 20, data_len);
}

/* A STEP frame at o: its header, description and ``data_len`` bytes of data already at o + 64. */
static size_t put_step(uint8_t *o, const Hop *h, uint32_t hop, int32_t pos, int32_t step, int32_t n, int first) {
    size_t data_len = first ? 4 : (size_t)h->n_embd * 4;
    put_header(o, KIND_STEP, h->rid, META_BYTES, data_len);
    uint8_t *om = o + HEADER_BYTES;
    put64(om, (uint64_t)h->link);
    put32(om + 8, hop);
    put32(om + 12, (uint32_t)pos);
    put32(om + 16, (uint32_t)step);
    put32(om + 20, (uint32_t)n);
    om[24] = first ? CODE_I32 : CODE_F32;
    om[25] = first ? 1 : 2;
    om[26] = om[27] = 0;
    put32(om + 28, 1);
    put32(om + 32, first ? 0 : (uint32_t)h->n_embd);
    return HEADER_BYTES + META_BYTES + data_len;
}

/* Send what the socket takes now; the bytes sent (an error other than a full socket: err). */
static size_t send_now(int fd, const uint8_t *p, size_t len, int64_t *err) {
    size_t sent = 0;
    while (sent < len) {
        ssize_t s = send(fd, p + sent, len - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (s < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) *err = errno;
            break;
        }
        sent += (size_t)s;
    }
    return sent;
}

/* The cell for position ``pos`` in the sliding group, placed in swa_scratch (a copy of the
 * cells) as SlidingCells.place places one row; -1 when the step is not the plain case: a rewind,
 * no usable cell, or attended cells other than the graph's. */
static int64_t swa_place(const Hop *h, int64_t pos) {
    int64_t size = h->swa_size, *c = h->swa_scratch;
    memcpy(c, h->swa_pos, (size_t)size * 8);
    int64_t pos_max = -1, used = 0;
    for (int64_t j = 0; j < size; j++) {
        if (c[j] > pos_max) pos_max = c[j];
        if (c[j] >= 0) used++;
    }
    if (pos <= pos_max) return -1; /* a rewind: Python's */
    int64_t head = h->swa_heads[0] > used + 2 ? 0 : h->swa_heads[0];
    int64_t cell = -1, tested = 0;
    while (cell < 0) {
        if (head >= size) {
            tested += size - head;
            head = 0;
            continue;
        }
        int64_t idx = head++;
        tested++;
        if (c[idx] < 0 || pos_max + 1 - c[idx] >= h->swa_window) cell = idx;
        if (cell < 0 && tested >= size) return -1;
    }
    int64_t gone = c[cell];
    c[cell] = pos;
    if (gone >= 0) { /* the positions up to the one overwritten leave (llama.cpp's seq_rm) */
        int64_t pos_min = INT64_MAX;
        for (int64_t j = 0; j < size; j++)
            if (c[j] >= 0 && c[j] < pos_min) pos_min = c[j];
        if (pos_min <= gone)
            for (int64_t j = 0; j < size; j++)
                if (c[j] >= pos_min && c[j] <= gone) c[j] = -1;
    }
    int64_t used_max_p1 = 0;
    for (int64_t j = size - 1; j >= 0; j--)
        if (c[j] >= 0) {
            used_max_p1 = j + 1;
            break;
        }
    int64_t n_kv = (used_max_p1 + h->swa_pad - 1) / h->swa_pad * h->swa_pad;
    if (n_kv < h->swa_pad) n_kv = h->swa_pad;
    if (n_kv > size) n_kv = size;
    return n_kv == h->swa_n_kv ? cell : -1;
}

/* The sliding group's inputs for the row at ``pos`` in ``cell`` (the cells placed). */
static void swa_inputs(Hop *h, int64_t pos, int64_t cell) {
    h->swa_k_buf[0] = cell;
    for (int64_t i = 0; i < h->swa_n_v; i++) h->swa_v_buf[i] = h->swa_v_rows[i] + cell;
    const int64_t *c = h->swa_pos;
    if (h->mask_f16) {
        uint16_t *m = (uint16_t *)h->swa_mask_buf;
        for (int64_t j = 0; j < h->swa_n_kv; j++)
            m[j] = c[j] >= 0 && c[j] <= pos && pos - c[j] < h->swa_window ? 0x0000 : 0xFC00;
    } else {
        float *m = (float *)h->swa_mask_buf;
        for (int64_t j = 0; j < h->swa_n_kv; j++)
            m[j] = c[j] >= 0 && c[j] <= pos && pos - c[j] < h->swa_window ? 0.0f : -INFINITY;
    }
}

int llmrpc_hop(Hop *h) {
    uint8_t *b = h->buf;
    size_t in_data = h->first ? 4 : (size_t)h->n_embd * 4;
    size_t in_total = HEADER_BYTES + META_BYTES + in_data;
    ssize_t got = recv((int)h->in_fd, b, in_total, MSG_PEEK | MSG_DONTWAIT);
    if (got < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? HOP_NOTHING : HOP_NOT_MINE;
    if ((size_t)got < in_total) return HOP_NOT_MINE; /* a part, or the end: Python reads it */
    uint64_t rid, data_len;
    uint32_t meta_len;
    memcpy(&rid, b + 8, 8);
    memcpy(&meta_len, b + 16, 4);
    memcpy(&data_len, b + 20, 8);
    if (memcmp(b, "LRD1", 4) != 0 || b[4] != KIND_STEP || rid != (uint64_t)h->rid || meta_len != META_BYTES ||
        data_len != in_data)
        return HOP_NOT_MINE;
    const uint8_t *m = b + HEADER_BYTES;
    int64_t link;
    uint32_t hop, rows, cols;
    int32_t pos, step, n;
    memcpy(&link, m, 8);
    memcpy(&hop, m + 8, 4);
    memcpy(&pos, m + 12, 4);
    memcpy(&step, m + 16, 4);
    memcpy(&n, m + 20, 4);
    memcpy(&rows, m + 28, 4);
    memcpy(&cols, m + 32, 4);
    uint8_t code = m[24], ndim = m[25];
    if (link != h->link || hop != (uint32_t)h->hop || pos != h->length || pos + 1 > h->limit || step < 0 || n < 1 ||
        rows != 1)
        return HOP_NOT_MINE;
    const uint8_t *x = m + META_BYTES;
    if (h->first) {
        int32_t token;
        memcpy(&token, x, 4);
        if (code != CODE_I32 || ndim != 1 || cols != 0 || token < 0 || token >= h->n_vocab) return HOP_NOT_MINE;
    } else {
        if (code != CODE_F32 || ndim != 2 || cols != (uint32_t)h->n_embd) return HOP_NOT_MINE;
        for (int64_t i = 0; i < h->n_embd; i++) {
            float v;
            memcpy(&v, x + 4 * i, 4);
            if (!isfinite(v)) return HOP_NOT_MINE;
        }
    }
    int64_t swa_cell = -1;
    if (h->swa_size > 0 && (swa_cell = swa_place(h, pos)) < 0) return HOP_NOT_MINE;
    /* this machine's turn, without waiting: a turn that does not come at once is waited for in
       Python (server/turns.py), where the wait can be called off (its holder may be stopped) */
    if (h->lock_fd >= 0 && flock((int)h->lock_fd, LOCK_EX | LOCK_NB) != 0) return HOP_NOT_MINE;
    /* the frame is ours: take it off the socket (it is all there, peeked) */
    size_t have = 0;
    while (have < in_total) {
        ssize_t r = recv((int)h->in_fd, b + have, in_total - have, MSG_DONTWAIT);
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            h->err = r < 0 ? errno : 0;
            if (h->lock_fd >= 0) flock((int)h->lock_fd, LOCK_UN);
            return HOP_BROKEN;
        }
        have += (size_t)r;
    }
    h->pos = pos;
    h->step = step;
    h->n = n;

    /* the row's inputs (graphs.py's RowInputs.write; the sliding group's as SlidingCells) */
    h->pos_buf[0] = pos;
    if (h->has_full) {
        h->k_buf[0] = pos;
        for (int64_t i = 0; i < h->n_embd_kv; i++) h->v_buf[i] = h->v_rows[i] + pos;
        if (h->mask_f16) {
            uint16_t *m = (uint16_t *)h->mask_buf;
            if (pos + 1 > h->allowed)
                for (int64_t j = h->allowed; j < pos + 1; j++) m[j] = 0x0000;
            else
                for (int64_t j = pos + 1; j < h->allowed; j++) m[j] = 0xFC00;
        } else {
            float *m = (float *)h->mask_buf;
            if (pos + 1 > h->allowed)
                for (int64_t j = h->allowed; j < pos + 1; j++) m[j] = 0.0f;
            else
                for (int64_t j = pos + 1; j < h->allowed; j++) m[j] = -INFINITY;
        }
        h->allowed = pos + 1;
    }
    if (h->swa_size > 0) {
        memcpy(h->swa_pos, h->swa_scratch, (size_t)h->swa_size * 8);
        h->swa_heads[0] = swa_cell + 1;
        swa_inputs(h, pos, swa_cell);
    }

    /* the parked workers back (openmp.py's claim), the host's turn, the graph, the workers parked */
    if (h->team_state != NULL && h->team_state[0]) {
        if (!h->team_state[1])
            for (int64_t k = 0; k < h->n_threads - 1; k++) sem_post((sem_t *)h->sem);
        h->gomp_end();
        h->team_state[0] = 0;
        while (sem_trywait((sem_t *)h->sem) == 0) {
        }
    }
    h->tensor_set(h->inp_x, x, 0, in_data);
    h->tensor_set(h->inp_pos, h->pos_buf, 0, 4);
    if (h->has_full) {
        h->tensor_set(h->inp_k, h->k_buf, 0, 8);
        h->tensor_set(h->inp_v, h->v_buf, 0, (size_t)h->n_embd_kv * 8);
        h->tensor_set(h->inp_mask, h->mask_buf, 0, (size_t)h->n_kv * (h->mask_f16 ? 2 : 4));
    }
    if (h->swa_size > 0) {
        h->tensor_set(h->swa_inp_k, h->swa_k_buf, 0, 8);
        h->tensor_set(h->swa_inp_v, h->swa_v_buf, 0, (size_t)h->swa_n_v * 8);
        h->tensor_set(h->swa_inp_mask, h->swa_mask_buf, 0, (size_t)h->swa_n_kv * (h->mask_f16 ? 2 : 4));
    }
    int status = h->compute(h->sched, h->gf);
    h->synchronize(h->sched);
    if (h->lock_fd >= 0) flock((int)h->lock_fd, LOCK_UN);
    if (h->team_state != NULL) {
        h->gomp_start(h->sem_wait_fn, h->sem, (unsigned)h->n_threads);
        h->team_state[0] = 1;
        h->team_state[1] = 0;
    }
    h->length = pos + 1;
    if (status != 0) {
        h->status = status;
        return HOP_COMPUTE_FAILED;
    }

    h->err = 0;
    uint8_t *o = h->buf;
    if (!h->last) { /* the hidden state on, as the next hop's STEP */
        h->tensor_get(h->out, o + HEADER_BYTES + META_BYTES, 0, (size_t)h->n_embd * 4);
        size_t len = put_step(o, h, (uint32_t)(h->hop + 1), pos, step, n, 0);
        h->sent = (int64_t)send_now((int)h->out_fd, o, len, &h->err);
        return HOP_DONE;
    }
    /* the token (the graph's argmax), reported, and on to the first server as the next step */
    int32_t token;
    h->tensor_get(h->out, &token, 0, 4);
    h->token = token;
    int ends = n <= 1 || pos + 2 > h->gen_limit;
    for (int64_t i = 0; i < h->n_eog && !ends; i++) ends = token == h->eog[i];
    if (ends) return HOP_ENDED;
    uint8_t report[HEADER_BYTES + TOKEN_BYTES];
    put_header(report, KIND_TOKEN, h->rid, TOKEN_BYTES, 0);
    put32(report + HEADER_BYTES, (uint32_t)token);
    put32(report + HEADER_BYTES + 4, (uint32_t)step);
    memset(report + HEADER_BYTES + 8, 0, 4); /* end: none (codec.TOKEN_ENDS[0]) */
    memcpy(o + HEADER_BYTES + META_BYTES, &token, 4);
    size_t len = put_step(o, h, 0, pos + 1, step + 1, n - 1, 1);
    h->sent = (int64_t)send_now((int)h->out_fd, o, len, &h->err);
    h->head_err = 0;
    h->reported = (int64_t)send_now((int)h->head_fd, report, sizeof report, &h->head_err);
    return HOP_DONE;
}
