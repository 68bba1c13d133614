/*
 * fakenvml.c - a fault-injectable stand-in for libnvidia-ml.so.1.
 *
 * Why: no machine that runs the gpu-supervisor test suite has a GPU, yet the
 * supervisor must be exercised through the *real* pynvml bindings (struct
 * layouts, error mapping, two-call buffer patterns).  This library exports
 * the NVML entry points pynvml looks up, answers them from a plain-text state
 * directory, and lets tests change that state - or inject faults such as a
 * lost GPU, a hanging call or XID events - while the process under test runs.
 *
 * The state directory is named by $GPUSUP_FAKENVML_DIR, read at every
 * nvmlInit* call.  It holds:
 *   state   key=value lines ('#' comments), replaced atomically by writers.
 *           Re-read whenever stat() says it changed (checked on every call).
 *   events  append-only lines "xid <gpu> <code> [count]" and the extension
 *           "event <gpu> <eventType> <eventData> [count]".
 * The key list and defaults are documented in probes/nvml_standin/__init__.py
 * and mirrored by the gpu_fields[] table below.
 *
 * Locking: g_lock guards the parsed state; it is held only while checking,
 * parsing or copying state, never while sleeping (hangs, event waits).  Each
 * event set has its own lock; g_sets_lock guards the registry of live sets.
 * No two of these locks are ever held at the same time.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- NVML ABI subset (values and layouts as in nvml.h / pynvml) ---- */

typedef enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_ALREADY_INITIALIZED = 5,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_INSUFFICIENT_POWER = 8,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_IRQ_ISSUE = 11,
    NVML_ERROR_LIBRARY_NOT_FOUND = 12,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_CORRUPTED_INFOROM = 14,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_RESET_REQUIRED = 16,
    NVML_ERROR_OPERATING_SYSTEM = 17,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_IN_USE = 19,
    NVML_ERROR_MEMORY = 20,
    NVML_ERROR_NO_DATA = 21,
    NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22,
    NVML_ERROR_INSUFFICIENT_RESOURCES = 23,
    NVML_ERROR_FREQ_NOT_SUPPORTED = 24,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_DEPRECATED = 26,
    NVML_ERROR_NOT_READY = 27,
    NVML_ERROR_GPU_NOT_FOUND = 28,
    NVML_ERROR_INVALID_STATE = 29,
    NVML_ERROR_RESET_TYPE_NOT_SUPPORTED = 30,
    NVML_ERROR_UNKNOWN = 999
} nvmlReturn_t;

typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct nvmlEventSet_st *nvmlEventSet_t;

/* pynvml's nvmlPciInfo_t (the v3 layout). */
typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

/* pynvml's c_nvmlMemory_t (v1). */
typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

/* pynvml's c_nvmlEventData_t. */
typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

#define EVENT_TYPE_XID 0x8ULL
#define MAX_GPUS 256
#define MAX_LINKS 36 /* NVML_NVLINK_MAX_LINKS */
#define NAME_LEN 96
#define LIST_LEN 2048
#define PATH_LEN (PATH_MAX + 16)
#define EVENT_BUF_CAP 65536
#define HANG_SLICE_MS 20
/* With inotify an append wakes the waiter at once; the slice only bounds how late a
 * freed set or nvmlShutdown is noticed, so it can be long and cost nothing idle. */
#define WAIT_SLICE_MS 500
#define FALLBACK_SLEEP_MS 2

/* ---- parsed state ---- */

typedef struct {
    unsigned int active;
    unsigned long long replay, recovery, crc_flit, crc_data, ecc_data;
} link_t;

typedef struct {
    char name[NAME_LEN];
    char uuid[NAME_LEN];
    char serial[32];
    char pci_bus_id[32];
    unsigned int pci_device_id, pci_subsystem_id;
    unsigned int minor;
    unsigned int ecc_mode;
    unsigned long long ecc_corr_vol, ecc_corr_agg, ecc_unc_vol, ecc_unc_agg;
    unsigned int retired_sbe, retired_dbe, retired_pending;
    unsigned int remap_corr, remap_unc, remap_pending, remap_failure;
    unsigned int temp, temp_slowdown, temp_shutdown;
    unsigned long long clocks_event_reasons;
    unsigned int power_mw, power_limit_mw;
    unsigned long long energy_mj;
    unsigned long long mem_total, mem_used;
    unsigned int pcie_gen, pcie_gen_max, pcie_width, pcie_width_max, pcie_replay;
    unsigned long long supported_events;
    unsigned int lost;
    unsigned int hang_ms;
    unsigned long long hang_until_ms;  /* wall clock (Unix ms) the hang ends at; 0: never */
    char hang_calls[LIST_LEN];
    char unsupported[LIST_LEN];
    unsigned int handle_error;  /* nonzero: nvmlDeviceGetHandleByIndex returns this code */
    unsigned int nvlink_count;
    link_t links[MAX_LINKS];
} gpu_t;

typedef struct {
    unsigned int gpu_count;
    unsigned int init_error;
    int cuda_driver_version;
    char driver_version[80];
    char nvml_version[80];
    gpu_t gpus[];
} config_t;

typedef enum { F_U32, F_U64, F_STR } ftype_t;

typedef struct {
    const char *key;
    ftype_t type;
    size_t off;
    size_t size;
} field_t;

#define GF(k, t, m) { k, t, offsetof(gpu_t, m), sizeof(((gpu_t *)0)->m) }

/* Per-GPU keys: "gpu.N.<key>". */
static const field_t gpu_fields[] = {
    GF("name", F_STR, name),
    GF("uuid", F_STR, uuid),
    GF("serial", F_STR, serial),
    GF("pci_bus_id", F_STR, pci_bus_id),
    GF("pci_device_id", F_U32, pci_device_id),
    GF("pci_subsystem_id", F_U32, pci_subsystem_id),
    GF("minor", F_U32, minor),
    GF("ecc_mode", F_U32, ecc_mode),
    GF("ecc.corrected.volatile", F_U64, ecc_corr_vol),
    GF("ecc.corrected.aggregate", F_U64, ecc_corr_agg),
    GF("ecc.uncorrected.volatile", F_U64, ecc_unc_vol),
    GF("ecc.uncorrected.aggregate", F_U64, ecc_unc_agg),
    GF("retired.sbe", F_U32, retired_sbe),
    GF("retired.dbe", F_U32, retired_dbe),
    GF("retired.pending", F_U32, retired_pending),
    GF("remap.correctable", F_U32, remap_corr),
    GF("remap.uncorrectable", F_U32, remap_unc),
    GF("remap.pending", F_U32, remap_pending),
    GF("remap.failure", F_U32, remap_failure),
    GF("temp", F_U32, temp),
    GF("temp.slowdown", F_U32, temp_slowdown),
    GF("temp.shutdown", F_U32, temp_shutdown),
    GF("clocks_event_reasons", F_U64, clocks_event_reasons),
    GF("power_mw", F_U32, power_mw),
    GF("power_limit_mw", F_U32, power_limit_mw),
    GF("energy_mj", F_U64, energy_mj),
    GF("memory.total_bytes", F_U64, mem_total),
    GF("memory.used_bytes", F_U64, mem_used),
    GF("pcie.gen", F_U32, pcie_gen),
    GF("pcie.gen_max", F_U32, pcie_gen_max),
    GF("pcie.width", F_U32, pcie_width),
    GF("pcie.width_max", F_U32, pcie_width_max),
    GF("pcie.replay", F_U32, pcie_replay),
    GF("supported_events", F_U64, supported_events),
    GF("lost", F_U32, lost),
    GF("hang_ms", F_U32, hang_ms),
    GF("hang_until_ms", F_U64, hang_until_ms),
    GF("hang_calls", F_STR, hang_calls),
    GF("unsupported", F_STR, unsupported),
    GF("handle_error", F_U32, handle_error),
    GF("nvlink.count", F_U32, nvlink_count),
};

#define LF(k, m) { k, F_U64, offsetof(link_t, m), sizeof(((link_t *)0)->m) }

/* Per-link keys: "gpu.N.nvlink.K.<key>". */
static const field_t link_fields[] = {
    { "active", F_U32, offsetof(link_t, active), sizeof(unsigned int) },
    LF("replay", replay),
    LF("recovery", recovery),
    LF("crc_flit", crc_flit),
    LF("crc_data", crc_data),
    LF("ecc_data", ecc_data),
};

/* Default PCI buses of the eight GPUs on an HGX H100 baseboard. */
static const unsigned int hgx_buses[8] = { 0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb };

/* ---- global state ---- */

struct nvmlDevice_st {
    char unused;
};

static struct nvmlDevice_st g_devices[MAX_GPUS]; /* handle of GPU i is &g_devices[i] */

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned int g_refcount;
static char g_dir[PATH_LEN];
static char g_state_path[PATH_LEN];
static char g_events_path[PATH_LEN];
static config_t *g_cfg;
/* The parsed state file is kept open so that its inode cannot be freed and
 * reused by the next atomic replacement (ext4 reuses inode numbers), which
 * makes (dev, ino) a reliable "same file" test. */
static int g_state_fd = -1;
static int g_state_present;
static struct stat g_state_st;

/* ---- small helpers ---- */

static long long now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000L;
}

/* Wall clock, for hang_until_ms: written by another process, so not CLOCK_MONOTONIC. */
static long long wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000LL + ts.tv_nsec / 1000000L;
}

static void sleep_us(long long us)
{
    if (us <= 0)
        return;
    struct timespec ts = { .tv_sec = (time_t)(us / 1000000), .tv_nsec = (long)(us % 1000000) * 1000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static void copy_str(char *dst, size_t size, const char *src)
{
    size_t n = strlen(src);
    if (n >= size)
        n = size - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t' || *s == '\r')
        s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n'))
        s[--n] = '\0';
    return s;
}

static int parse_u64(const char *s, unsigned long long *out)
{
    while (*s == ' ' || *s == '\t')
        s++;
    if (*s == '\0' || *s == '-' || *s == '+')
        return 0;
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno != 0 || end == s)
        return 0;
    while (*end == ' ' || *end == '\t')
        end++;
    if (*end != '\0')
        return 0;
    *out = v;
    return 1;
}

static int parse_index(const char **p, unsigned int *out)
{
    const char *s = *p;
    if (*s < '0' || *s > '9')
        return 0;
    unsigned long v = 0;
    while (*s >= '0' && *s <= '9') {
        v = v * 10 + (unsigned long)(*s - '0');
        if (v > 1000000UL)
            return 0;
        s++;
    }
    *out = (unsigned int)v;
    *p = s;
    return 1;
}

static void set_field(void *base, const field_t *f, const char *val)
{
    char *dst = (char *)base + f->off;
    unsigned long long v;
    switch (f->type) {
    case F_STR:
        copy_str(dst, f->size, val);
        break;
    case F_U32:
        if (parse_u64(val, &v)) {
            unsigned int u = v > 0xffffffffULL ? 0xffffffffU : (unsigned int)v;
            memcpy(dst, &u, sizeof u);
        }
        break;
    case F_U64:
        if (parse_u64(val, &v))
            memcpy(dst, &v, sizeof v);
        break;
    }
}

static int apply_field(void *base, const field_t *fields, size_t n, const char *key, const char *val)
{
    for (size_t i = 0; i < n; i++) {
        if (strcmp(fields[i].key, key) == 0) {
            set_field(base, &fields[i], val);
            return 1;
        }
    }
    return 0;
}

/*
 * Does function name `fn` appear in the comma/space separated `list`?
 * A token also matches `fn` with its "_vN" suffix removed, so
 * "nvmlDeviceGetPciInfo" covers nvmlDeviceGetPciInfo_v3.  A list without
 * tokens matches everything iff `empty_all`; a "*" token matches everything
 * iff `star_all`.
 */
static int list_matches(const char *list, const char *fn, int empty_all, int star_all)
{
    size_t fn_len = strlen(fn);
    size_t base_len = fn_len;
    const char *v = strrchr(fn, '_');
    if (v && v[1] == 'v' && v[2] >= '0' && v[2] <= '9')
        base_len = (size_t)(v - fn);
    int any = 0;
    const char *p = list;
    while (*p) {
        while (*p == ',' || *p == ' ' || *p == '\t')
            p++;
        const char *start = p;
        while (*p && *p != ',' && *p != ' ' && *p != '\t')
            p++;
        size_t len = (size_t)(p - start);
        if (len == 0)
            continue;
        any = 1;
        if (len == 1 && start[0] == '*' && star_all)
            return 1;
        if ((len == fn_len || len == base_len) && strncmp(start, fn, len) == 0)
            return 1;
    }
    return !any && empty_all;
}

/* ---- state parsing ---- */

static void gpu_defaults(gpu_t *g, unsigned int i)
{
    memset(g, 0, sizeof *g);
    copy_str(g->name, sizeof g->name, "NVIDIA H100 80GB HBM3");
    snprintf(g->uuid, sizeof g->uuid, "GPU-fa4e0000-0000-4000-8000-%012x", i);
    snprintf(g->serial, sizeof g->serial, "1654922%06u", i);
    if (i < 8)
        snprintf(g->pci_bus_id, sizeof g->pci_bus_id, "00000000:%02X:00.0", hgx_buses[i]);
    else
        snprintf(g->pci_bus_id, sizeof g->pci_bus_id, "00000001:%02X:00.0", i & 0xffU);
    g->pci_device_id = 0x233010deU;
    g->pci_subsystem_id = 0x16c110deU;
    g->minor = i;
    g->ecc_mode = 1;
    g->temp = 45;
    g->temp_slowdown = 87;
    g->temp_shutdown = 92;
    g->power_mw = 250000;
    g->power_limit_mw = 700000;
    g->mem_total = 85899345920ULL;
    g->pcie_gen = 5;
    g->pcie_gen_max = 5;
    g->pcie_width = 16;
    g->pcie_width_max = 16;
    /* SingleBitEcc | DoubleBitEcc | PState | XidCriticalError */
    g->supported_events = 0x1ULL | 0x2ULL | 0x4ULL | EVENT_TYPE_XID;
    g->nvlink_count = 18;
    for (unsigned int k = 0; k < MAX_LINKS; k++)
        g->links[k].active = 1;
}

typedef void (*kv_cb)(char *key, char *val, void *ctx);

/* Calls cb for every "key=value" line of text (comments/blank lines skipped). */
static void for_each_kv(const char *text, size_t len, kv_cb cb, void *ctx)
{
    char line[LIST_LEN + 256];
    size_t pos = 0;
    while (pos < len) {
        size_t end = pos;
        while (end < len && text[end] != '\n')
            end++;
        size_t n = end - pos;
        if (n < sizeof line) {
            memcpy(line, text + pos, n);
            line[n] = '\0';
            char *s = trim(line);
            char *eq = strchr(s, '=');
            if (*s != '\0' && *s != '#' && eq != NULL) {
                *eq = '\0';
                cb(trim(s), trim(eq + 1), ctx);
            }
        }
        pos = end + 1;
    }
}

static void kv_globals(char *key, char *val, void *ctx)
{
    config_t *c = ctx;
    unsigned long long v;
    if (strcmp(key, "gpu_count") == 0) {
        if (parse_u64(val, &v))
            c->gpu_count = v > MAX_GPUS ? MAX_GPUS : (unsigned int)v;
    } else if (strcmp(key, "driver_version") == 0) {
        copy_str(c->driver_version, sizeof c->driver_version, val);
    } else if (strcmp(key, "nvml_version") == 0) {
        copy_str(c->nvml_version, sizeof c->nvml_version, val);
    } else if (strcmp(key, "cuda_driver_version") == 0) {
        if (parse_u64(val, &v))
            c->cuda_driver_version = (int)v;
    } else if (strcmp(key, "init_error") == 0) {
        if (parse_u64(val, &v))
            c->init_error = (unsigned int)v;
    }
}

static void kv_gpus(char *key, char *val, void *ctx)
{
    config_t *c = ctx;
    const char *p = key;
    unsigned int i, k;
    if (strncmp(p, "gpu.", 4) != 0)
        return;
    p += 4;
    if (!parse_index(&p, &i) || *p != '.' || i >= c->gpu_count)
        return;
    p++;
    gpu_t *g = &c->gpus[i];
    if (strncmp(p, "nvlink.", 7) == 0 && p[7] >= '0' && p[7] <= '9') {
        p += 7;
        if (parse_index(&p, &k) && *p == '.' && k < MAX_LINKS)
            apply_field(&g->links[k], link_fields, sizeof link_fields / sizeof link_fields[0], p + 1, val);
        return;
    }
    apply_field(g, gpu_fields, sizeof gpu_fields / sizeof gpu_fields[0], p, val);
}

static config_t *parse_state(const char *text, size_t len)
{
    config_t head;
    memset(&head, 0, sizeof head);
    head.cuda_driver_version = 12040;
    copy_str(head.driver_version, sizeof head.driver_version, "550.54.15");
    copy_str(head.nvml_version, sizeof head.nvml_version, "12.550.54.15");
    if (text)
        for_each_kv(text, len, kv_globals, &head);
    config_t *c = malloc(sizeof(config_t) + (size_t)head.gpu_count * sizeof(gpu_t));
    if (!c)
        return NULL;
    memcpy(c, &head, sizeof head);
    for (unsigned int i = 0; i < c->gpu_count; i++)
        gpu_defaults(&c->gpus[i], i);
    if (text)
        for_each_kv(text, len, kv_gpus, c);
    for (unsigned int i = 0; i < c->gpu_count; i++)
        if (c->gpus[i].nvlink_count > MAX_LINKS)
            c->gpus[i].nvlink_count = MAX_LINKS;
    return c;
}

static int read_fd(int fd, char **out, size_t *out_len)
{
    size_t cap = 8192, len = 0;
    char *buf = malloc(cap);
    if (!buf)
        return 0;
    for (;;) {
        if (len == cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                return 0;
            }
            buf = nb;
            cap *= 2;
        }
        ssize_t r = read(fd, buf + len, cap - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            free(buf);
            return 0;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    *out = buf;
    *out_len = len;
    return 1;
}

static int same_file(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec &&
           a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}

/* Re-parse the state file if it changed since the last parse.  g_lock held. */
static void refresh_locked(void)
{
    struct stat st;
    int present = stat(g_state_path, &st) == 0;
    if (g_cfg && present == g_state_present && (!present || same_file(&st, &g_state_st)))
        return;
    char *text = NULL;
    size_t len = 0;
    int fd = -1;
    struct stat fst;
    memset(&fst, 0, sizeof fst);
    if (present) {
        fd = open(g_state_path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || fstat(fd, &fst) != 0 || !read_fd(fd, &text, &len)) {
            if (fd >= 0)
                close(fd);
            fd = -1;
            present = 0;
            text = NULL;
        }
    }
    config_t *c = parse_state(text, len);
    free(text);
    if (!c) {
        if (fd >= 0)
            close(fd);
        return; /* out of memory: keep the previous state */
    }
    free(g_cfg);
    g_cfg = c;
    if (g_state_fd >= 0)
        close(g_state_fd);
    g_state_fd = fd;
    g_state_present = present;
    g_state_st = fst;
}

static void drop_state_locked(void)
{
    free(g_cfg);
    g_cfg = NULL;
    if (g_state_fd >= 0)
        close(g_state_fd);
    g_state_fd = -1;
    g_state_present = 0;
}

/* ---- call prologues ---- */

/* Lock, check init, refresh.  On success g_lock is held and g_cfg valid. */
static nvmlReturn_t lock_state(void)
{
    pthread_mutex_lock(&g_lock);
    if (g_refcount == 0) {
        pthread_mutex_unlock(&g_lock);
        return NVML_ERROR_UNINITIALIZED;
    }
    refresh_locked();
    if (!g_cfg) {
        pthread_mutex_unlock(&g_lock);
        return NVML_ERROR_MEMORY;
    }
    return NVML_SUCCESS;
}

static long handle_index(nvmlDevice_t dev)
{
    uintptr_t p = (uintptr_t)dev, b = (uintptr_t)g_devices;
    if (p < b || p >= b + sizeof g_devices || (p - b) % sizeof g_devices[0] != 0)
        return -1;
    return (long)((p - b) / sizeof g_devices[0]);
}

/* Copy GPU idx's current state into *g. */
static nvmlReturn_t snapshot_gpu(unsigned int idx, gpu_t *g)
{
    nvmlReturn_t rc = lock_state();
    if (rc != NVML_SUCCESS)
        return rc;
    if (idx >= g_cfg->gpu_count) {
        pthread_mutex_unlock(&g_lock);
        return NVML_ERROR_GPU_IS_LOST; /* the GPU disappeared after its handle was taken */
    }
    *g = g_cfg->gpus[idx];
    pthread_mutex_unlock(&g_lock);
    return NVML_SUCCESS;
}

/*
 * Sleep while GPU idx is configured to hang `fn`, without holding any lock.
 * The configuration is re-read every HANG_SLICE_MS so that clearing (or
 * shortening) a hang releases blocked callers promptly; *g is left holding
 * the state current when the hang ended.
 */
static nvmlReturn_t apply_hang(const char *fn, unsigned int idx, gpu_t *g, int by_index)
{
    long long start = now_us();
    while (g->hang_ms > 0 && list_matches(g->hang_calls, fn, !by_index, !by_index)) {
        long long left = (long long)g->hang_ms * 1000LL - (now_us() - start);
        if (g->hang_until_ms) {
            long long until = ((long long)g->hang_until_ms - wall_ms()) * 1000LL;
            if (until < left)
                left = until;
        }
        if (left <= 0)
            break;
        sleep_us(left < HANG_SLICE_MS * 1000LL ? left : HANG_SLICE_MS * 1000LL);
        nvmlReturn_t rc = snapshot_gpu(idx, g);
        if (rc != NVML_SUCCESS)
            return rc;
    }
    return NVML_SUCCESS;
}

/*
 * Prologue of every call that takes a device handle: validates it, applies
 * the GPU's hang, lost and unsupported knobs, and hands back a snapshot.
 */
static nvmlReturn_t device_begin(const char *fn, nvmlDevice_t dev, gpu_t *g, unsigned int *idx_out)
{
    long idx = handle_index(dev);
    pthread_mutex_lock(&g_lock);
    int inited = g_refcount > 0;
    pthread_mutex_unlock(&g_lock);
    if (!inited)
        return NVML_ERROR_UNINITIALIZED;
    if (idx < 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = snapshot_gpu((unsigned int)idx, g);
    if (rc == NVML_SUCCESS)
        rc = apply_hang(fn, (unsigned int)idx, g, 0);
    if (rc != NVML_SUCCESS)
        return rc;
    if (g->lost)
        return NVML_ERROR_GPU_IS_LOST;
    if (list_matches(g->unsupported, fn, 0, 1))
        return NVML_ERROR_NOT_SUPPORTED;
    if (idx_out)
        *idx_out = (unsigned int)idx;
    return NVML_SUCCESS;
}

static nvmlReturn_t put_str(char *buf, unsigned int len, const char *s)
{
    if (!buf)
        return NVML_ERROR_INVALID_ARGUMENT;
    size_t n = strlen(s);
    if (n + 1 > len)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, s, n + 1);
    return NVML_SUCCESS;
}

/* ---- init / shutdown / system ---- */

static nvmlReturn_t do_init(void)
{
    const char *dir = getenv("GPUSUP_FAKENVML_DIR");
    struct stat st;
    if (!dir || !*dir || strlen(dir) >= PATH_MAX || stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return NVML_ERROR_DRIVER_NOT_LOADED;
    pthread_mutex_lock(&g_lock);
    copy_str(g_dir, sizeof g_dir, dir);
    snprintf(g_state_path, sizeof g_state_path, "%s/state", dir);
    snprintf(g_events_path, sizeof g_events_path, "%s/events", dir);
    drop_state_locked(); /* force a fresh read of the (possibly different) directory */
    refresh_locked();
    nvmlReturn_t rc = NVML_SUCCESS;
    if (!g_cfg)
        rc = NVML_ERROR_MEMORY;
    else if (g_cfg->init_error != 0)
        rc = (nvmlReturn_t)g_cfg->init_error;
    if (rc == NVML_SUCCESS)
        g_refcount++;
    else if (g_refcount == 0)
        drop_state_locked();
    pthread_mutex_unlock(&g_lock);
    return rc;
}

nvmlReturn_t nvmlInit_v2(void)
{
    return do_init();
}

nvmlReturn_t nvmlInit(void)
{
    return do_init();
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    return do_init();
}

nvmlReturn_t nvmlShutdown(void)
{
    pthread_mutex_lock(&g_lock);
    if (g_refcount == 0) {
        pthread_mutex_unlock(&g_lock);
        return NVML_ERROR_UNINITIALIZED;
    }
    if (--g_refcount == 0)
        drop_state_locked();
    pthread_mutex_unlock(&g_lock);
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_INSUFFICIENT_POWER: return "Insufficient External Power";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_IRQ_ISSUE: return "Interrupt Request Issue";
    case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_CORRUPTED_INFOROM: return "Corrupted infoROM";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_OPERATING_SYSTEM: return "The operating system has blocked the request.";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    case NVML_ERROR_IN_USE: return "In use by another client";
    case NVML_ERROR_MEMORY: return "Insufficient Memory";
    case NVML_ERROR_NO_DATA: return "No data";
    case NVML_ERROR_VGPU_ECC_NOT_SUPPORTED: return "The requested vgpu operation is not available on target device, because ECC is enabled";
    case NVML_ERROR_INSUFFICIENT_RESOURCES: return "Ran out of critical resources, other than memory";
    case NVML_ERROR_FREQ_NOT_SUPPORTED: return "The requested frequency is not supported";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "The provided version is invalid/unsupported";
    case NVML_ERROR_DEPRECATED: return "The requested functionality has been deprecated";
    case NVML_ERROR_NOT_READY: return "The system is not ready for the request";
    case NVML_ERROR_GPU_NOT_FOUND: return "The GPU was not found";
    case NVML_ERROR_INVALID_STATE: return "The resource is in an invalid state";
    case NVML_ERROR_RESET_TYPE_NOT_SUPPORTED: return "The reset type is not supported";
    case NVML_ERROR_UNKNOWN: return "Unknown Error";
    }
    return "Unknown Error";
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    char v[80];
    nvmlReturn_t rc = lock_state();
    if (rc != NVML_SUCCESS)
        return rc;
    copy_str(v, sizeof v, g_cfg->driver_version);
    pthread_mutex_unlock(&g_lock);
    return put_str(version, length, v);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    char v[80];
    nvmlReturn_t rc = lock_state();
    if (rc != NVML_SUCCESS)
        return rc;
    copy_str(v, sizeof v, g_cfg->nvml_version);
    pthread_mutex_unlock(&g_lock);
    return put_str(version, length, v);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion)
{
    if (!cudaDriverVersion)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = lock_state();
    if (rc != NVML_SUCCESS)
        return rc;
    *cudaDriverVersion = g_cfg->cuda_driver_version;
    pthread_mutex_unlock(&g_lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *cudaDriverVersion)
{
    return nvmlSystemGetCudaDriverVersion(cudaDriverVersion);
}

/* ---- device enumeration ---- */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    nvmlReturn_t rc = lock_state();
    if (rc != NVML_SUCCESS)
        return rc;
    unsigned int n = g_cfg->gpu_count;
    pthread_mutex_unlock(&g_lock);
    if (!deviceCount)
        return NVML_ERROR_INVALID_ARGUMENT;
    *deviceCount = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return nvmlDeviceGetCount_v2(deviceCount);
}

/*
 * Handles stay obtainable for a lost GPU (as with the real driver, the loss
 * shows on the first query); hang/unsupported apply here only when the
 * function is named explicitly in hang_calls/unsupported.
 */
static nvmlReturn_t handle_by_index(const char *fn, unsigned int index, nvmlDevice_t *device)
{
    gpu_t *g = malloc(sizeof *g);
    if (!g)
        return NVML_ERROR_MEMORY;
    nvmlReturn_t rc = lock_state();
    if (rc != NVML_SUCCESS) {
        free(g);
        return rc;
    }
    if (!device || index >= g_cfg->gpu_count) {
        pthread_mutex_unlock(&g_lock);
        free(g);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *g = g_cfg->gpus[index];
    pthread_mutex_unlock(&g_lock);
    rc = apply_hang(fn, index, g, 1);
    if (rc == NVML_SUCCESS && g->handle_error != 0)
        rc = (nvmlReturn_t)g->handle_error;
    if (rc == NVML_SUCCESS && list_matches(g->unsupported, fn, 0, 0))
        rc = NVML_ERROR_NOT_SUPPORTED;
    free(g);
    if (rc == NVML_SUCCESS)
        *device = &g_devices[index];
    return rc;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    return handle_by_index("nvmlDeviceGetHandleByIndex_v2", index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return handle_by_index("nvmlDeviceGetHandleByIndex", index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    if (!uuid || !device)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = lock_state();
    if (rc != NVML_SUCCESS)
        return rc;
    rc = NVML_ERROR_NOT_FOUND;
    for (unsigned int i = 0; i < g_cfg->gpu_count; i++) {
        if (strcmp(g_cfg->gpus[i].uuid, uuid) == 0) {
            *device = &g_devices[i];
            rc = NVML_SUCCESS;
            break;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static int parse_bus_id(const char *s, unsigned int *dom, unsigned int *bus, unsigned int *dev, unsigned int *fn)
{
    *fn = 0;
    return sscanf(s, "%x:%x:%x.%x", dom, bus, dev, fn) >= 3;
}

nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device)
{
    unsigned int d, b, v, f, d2, b2, v2, f2;
    if (!pciBusId || !device || !parse_bus_id(pciBusId, &d, &b, &v, &f))
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = lock_state();
    if (rc != NVML_SUCCESS)
        return rc;
    rc = NVML_ERROR_NOT_FOUND;
    for (unsigned int i = 0; i < g_cfg->gpu_count; i++) {
        if (parse_bus_id(g_cfg->gpus[i].pci_bus_id, &d2, &b2, &v2, &f2) && d == d2 && b == b2 && v == v2 &&
            f == f2) {
            *device = &g_devices[i];
            rc = NVML_SUCCESS;
            break;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* ---- per-device queries ---- */

/* Declares `gpu_t *g` (heap: gpu_t is a few KiB) and runs device_begin. */
#define BEGIN(fn, dev, idxp)                                   \
    gpu_t *g = malloc(sizeof(gpu_t));                          \
    if (!g)                                                    \
        return NVML_ERROR_MEMORY;                              \
    nvmlReturn_t rc = device_begin(fn, dev, g, idxp);          \
    if (rc != NVML_SUCCESS)                                    \
        goto out;

#define END  \
    out:     \
    free(g); \
    return rc;

#define SIMPLE_GETTER(fn_name, out_type, expr)                 \
    nvmlReturn_t fn_name(nvmlDevice_t device, out_type *out)   \
    {                                                          \
        if (!out)                                              \
            return NVML_ERROR_INVALID_ARGUMENT;                \
        BEGIN(#fn_name, device, NULL)                          \
        *out = (out_type)(expr);                               \
        END                                                    \
    }

#define STRING_GETTER(fn_name, member)                                      \
    nvmlReturn_t fn_name(nvmlDevice_t device, char *buf, unsigned int len)  \
    {                                                                       \
        if (!buf)                                                           \
            return NVML_ERROR_INVALID_ARGUMENT;                             \
        BEGIN(#fn_name, device, NULL)                                       \
        rc = put_str(buf, len, g->member);                                  \
        END                                                                 \
    }

STRING_GETTER(nvmlDeviceGetName, name)
STRING_GETTER(nvmlDeviceGetUUID, uuid)
STRING_GETTER(nvmlDeviceGetSerial, serial)

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    unsigned int idx = 0;
    if (!index)
        return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN("nvmlDeviceGetIndex", device, &idx)
    *index = idx;
    END
}

SIMPLE_GETTER(nvmlDeviceGetMinorNumber, unsigned int, g->minor)

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    unsigned int d = 0, b = 0, v = 0, f = 0;
    if (!pci)
        return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN("nvmlDeviceGetPciInfo_v3", device, NULL)
    memset(pci, 0, sizeof *pci);
    parse_bus_id(g->pci_bus_id, &d, &b, &v, &f);
    copy_str(pci->busId, sizeof pci->busId, g->pci_bus_id);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.%X", d & 0xffffU, b & 0xffU, v & 0xffU,
             f & 0xfU);
    pci->domain = d;
    pci->bus = b;
    pci->device = v;
    pci->pciDeviceId = g->pci_device_id;
    pci->pciSubSystemId = g->pci_subsystem_id;
    END
}

nvmlReturn_t nvmlDeviceGetEccMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending)
{
    if (!current || !pending)
        return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN("nvmlDeviceGetEccMode", device, NULL)
    *current = g->ecc_mode ? 1 : 0;
    *pending = *current;
    END
}

/* errorType CORRECTED=0/UNCORRECTED=1, counterType VOLATILE=0/AGGREGATE=1.
 * NOT_SUPPORTED while ECC is disabled, as on real hardware. */
nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, unsigned int errorType, unsigned int counterType,
                                         unsigned long long *eccCounts)
{
    if (!eccCounts || errorType > 1 || counterType > 1)
        return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN("nvmlDeviceGetTotalEccErrors", device, NULL)
    if (!g->ecc_mode) {
        rc = NVML_ERROR_NOT_SUPPORTED;
        goto out;
    }
    if (errorType == 0)
        *eccCounts = counterType == 0 ? g->ecc_corr_vol : g->ecc_corr_agg;
    else
        *eccCounts = counterType == 0 ? g->ecc_unc_vol : g->ecc_unc_agg;
    END
}

static unsigned long long fake_page_address(unsigned int gpu, unsigned int cause, unsigned int i)
{
    return ((unsigned long long)(gpu + 1) << 32) | ((unsigned long long)cause << 28) | (0x1000ULL + i);
}

/* Two-call pattern: a NULL buffer (or a short one) yields INSUFFICIENT_SIZE
 * with the required count when pages exist, SUCCESS with 0 otherwise. */
static nvmlReturn_t retired_pages(const char *fn, nvmlDevice_t device, unsigned int cause, unsigned int *count,
                                  unsigned long long *addresses, unsigned long long *timestamps)
{
    unsigned int idx = 0;
    if (!count || cause > 1)
        return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN(fn, device, &idx)
    {
        unsigned int n = cause == 0 ? g->retired_sbe : g->retired_dbe;
        if (n > 0 && (!addresses || *count < n)) {
            *count = n;
            rc = NVML_ERROR_INSUFFICIENT_SIZE;
            goto out;
        }
        for (unsigned int i = 0; i < n; i++) {
            addresses[i] = fake_page_address(idx, cause, i);
            if (timestamps)
                timestamps[i] = 1700000000ULL * 1000000ULL + i;
        }
        *count = n;
    }
    END
}

nvmlReturn_t nvmlDeviceGetRetiredPages(nvmlDevice_t device, unsigned int cause, unsigned int *pageCount,
                                       unsigned long long *addresses)
{
    return retired_pages("nvmlDeviceGetRetiredPages", device, cause, pageCount, addresses, NULL);
}

nvmlReturn_t nvmlDeviceGetRetiredPages_v2(nvmlDevice_t device, unsigned int cause, unsigned int *pageCount,
                                          unsigned long long *addresses, unsigned long long *timestamps)
{
    return retired_pages("nvmlDeviceGetRetiredPages_v2", device, cause, pageCount, addresses, timestamps);
}

SIMPLE_GETTER(nvmlDeviceGetRetiredPagesPendingStatus, unsigned int, g->retired_pending ? 1 : 0)

nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *corrRows, unsigned int *uncRows,
                                       unsigned int *isPending, unsigned int *failureOccurred)
{
    if (!corrRows || !uncRows || !isPending || !failureOccurred)
        return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN("nvmlDeviceGetRemappedRows", device, NULL)
    *corrRows = g->remap_corr;
    *uncRows = g->remap_unc;
    *isPending = g->remap_pending ? 1 : 0;
    *failureOccurred = g->remap_failure ? 1 : 0;
    END
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensorType, unsigned int *temp)
{
    if (!temp || sensorType != 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN("nvmlDeviceGetTemperature", device, NULL)
    *temp = g->temp;
    END
}

nvmlReturn_t nvmlDeviceGetTemperatureThreshold(nvmlDevice_t device, unsigned int thresholdType, unsigned int *temp)
{
    if (!temp)
        return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN("nvmlDeviceGetTemperatureThreshold", device, NULL)
    if (thresholdType == 0)
        *temp = g->temp_shutdown;
    else if (thresholdType == 1)
        *temp = g->temp_slowdown;
    else
        rc = NVML_ERROR_NOT_SUPPORTED;
    END
}

SIMPLE_GETTER(nvmlDeviceGetCurrentClocksEventReasons, unsigned long long, g->clocks_event_reasons)
SIMPLE_GETTER(nvmlDeviceGetCurrentClocksThrottleReasons, unsigned long long, g->clocks_event_reasons)
SIMPLE_GETTER(nvmlDeviceGetPowerUsage, unsigned int, g->power_mw)
SIMPLE_GETTER(nvmlDeviceGetEnforcedPowerLimit, unsigned int, g->power_limit_mw)
SIMPLE_GETTER(nvmlDeviceGetTotalEnergyConsumption, unsigned long long, g->energy_mj)

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN("nvmlDeviceGetMemoryInfo", device, NULL)
    memory->total = g->mem_total;
    memory->used = g->mem_used;
    memory->free = g->mem_used >= g->mem_total ? 0 : g->mem_total - g->mem_used;
    END
}

/* nvlink.count == 0 means "no NVLink" (NOT_SUPPORTED); link >= count is
 * INVALID_ARGUMENT, like asking a real GPU for a link it does not have. */
static nvmlReturn_t check_link(const gpu_t *g, unsigned int link)
{
    if (g->nvlink_count == 0)
        return NVML_ERROR_NOT_SUPPORTED;
    if (link >= g->nvlink_count)
        return NVML_ERROR_INVALID_ARGUMENT;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link, unsigned int *isActive)
{
    if (!isActive)
        return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN("nvmlDeviceGetNvLinkState", device, NULL)
    rc = check_link(g, link);
    if (rc == NVML_SUCCESS)
        *isActive = g->links[link].active ? 1 : 0;
    END
}

nvmlReturn_t nvmlDeviceGetNvLinkErrorCounter(nvmlDevice_t device, unsigned int link, unsigned int counter,
                                             unsigned long long *counterValue)
{
    if (!counterValue || counter > 4)
        return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN("nvmlDeviceGetNvLinkErrorCounter", device, NULL)
    rc = check_link(g, link);
    if (rc == NVML_SUCCESS) {
        const link_t *l = &g->links[link];
        switch (counter) {
        case 0: *counterValue = l->replay; break;
        case 1: *counterValue = l->recovery; break;
        case 2: *counterValue = l->crc_flit; break;
        case 3: *counterValue = l->crc_data; break;
        default: *counterValue = l->ecc_data; break;
        }
    }
    END
}

/* nvmlFieldValue_t as nvml.h lays it out (40 bytes: pynvml's c_nvmlFieldValue_t). */
typedef struct {
    unsigned int fieldId;
    unsigned int scopeId;
    long long timestamp;   /* microseconds */
    long long latencyUsec;
    int valueType;         /* nvmlValueType_t */
    int nvmlReturn;
    union {
        double dVal;
        unsigned int uiVal;
        unsigned long ulVal;
        unsigned long long ullVal;
        long long sllVal;
        int siVal;
        unsigned short usVal;
    } value;
} nvmlFieldValue_t;

#define NVML_VALUE_TYPE_UNSIGNED_LONG_LONG 3
/* The NVLink error totals over every link (NVML_FI_DEV_NVLINK_*_ERROR_COUNT_TOTAL): what a
 * monitor reads in one call instead of one per link and counter. Other fields answer
 * NOT_SUPPORTED in their own nvmlReturn, as NVML does for a field a GPU lacks. */
nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int valuesCount, nvmlFieldValue_t *values)
{
    if (!values || valuesCount < 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN("nvmlDeviceGetFieldValues", device, NULL)
    long long now = now_us();
    for (int i = 0; i < valuesCount; i++) {
        nvmlFieldValue_t *v = &values[i];
        unsigned long long total = 0;
        int which; /* link_t counter: replay 0, recovery 1, crc_flit 2, crc_data 3, ecc_data 4 */
        switch (v->fieldId) {
        case 52: which = 0; break;  /* REPLAY_ERROR_COUNT_TOTAL */
        case 59: which = 1; break;  /* RECOVERY_ERROR_COUNT_TOTAL */
        case 38: which = 2; break;  /* CRC_FLIT_ERROR_COUNT_TOTAL */
        case 45: which = 3; break;  /* CRC_DATA_ERROR_COUNT_TOTAL */
        case 160: which = 4; break; /* ECC_DATA_ERROR_COUNT_TOTAL */
        default: which = -1; break;
        }
        v->timestamp = now;
        v->latencyUsec = 0;
        v->valueType = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
        if (which < 0 || g->nvlink_count == 0) {
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            v->value.ullVal = 0;
            continue;
        }
        for (unsigned int k = 0; k < g->nvlink_count; k++) {
            const link_t *l = &g->links[k];
            total += which == 0 ? l->replay : which == 1 ? l->recovery : which == 2 ? l->crc_flit
                   : which == 3 ? l->crc_data : l->ecc_data;
        }
        v->nvmlReturn = NVML_SUCCESS;
        v->value.ullVal = total;
    }
    END
}

SIMPLE_GETTER(nvmlDeviceGetCurrPcieLinkGeneration, unsigned int, g->pcie_gen)
SIMPLE_GETTER(nvmlDeviceGetMaxPcieLinkGeneration, unsigned int, g->pcie_gen_max)
SIMPLE_GETTER(nvmlDeviceGetCurrPcieLinkWidth, unsigned int, g->pcie_width)
SIMPLE_GETTER(nvmlDeviceGetMaxPcieLinkWidth, unsigned int, g->pcie_width_max)
SIMPLE_GETTER(nvmlDeviceGetPcieReplayCounter, unsigned int, g->pcie_replay)
SIMPLE_GETTER(nvmlDeviceGetSupportedEventTypes, unsigned long long, g->supported_events)

/* ---- events ---- */

struct nvmlEventSet_st {
    struct nvmlEventSet_st *next; /* registry link, guarded by g_sets_lock */
    int users;                    /* calls in progress, guarded by g_sets_lock */
    int freed;                    /* nvmlEventSetFree called, guarded by g_sets_lock */
    pthread_mutex_t lock;         /* guards everything below */
    char path[PATH_LEN];
    int inotify_fd; /* -1: fall back to short sleeps */
    unsigned long long offset; /* file offset just past the bytes read into buf */
    char *buf;
    size_t buf_len, buf_pos; /* unparsed bytes are buf[buf_pos, buf_len) */
    unsigned long long mask[MAX_GPUS];
    unsigned long long reg_offset[MAX_GPUS]; /* lines starting before this are not for us */
    unsigned int pend_gpu;
    unsigned long long pend_type, pend_data, pend_count;
};

static pthread_mutex_t g_sets_lock = PTHREAD_MUTEX_INITIALIZER;
static struct nvmlEventSet_st *g_sets;

static void destroy_set(struct nvmlEventSet_st *s)
{
    if (s->inotify_fd >= 0)
        close(s->inotify_fd);
    pthread_mutex_destroy(&s->lock);
    free(s->buf);
    free(s);
}

/* Pin a live set (validating the handle without dereferencing it). */
static struct nvmlEventSet_st *acquire_set(nvmlEventSet_t set)
{
    struct nvmlEventSet_st *found = NULL;
    pthread_mutex_lock(&g_sets_lock);
    for (struct nvmlEventSet_st *s = g_sets; s; s = s->next) {
        if (s == set && !s->freed) {
            s->users++;
            found = s;
            break;
        }
    }
    pthread_mutex_unlock(&g_sets_lock);
    return found;
}

static void release_set(struct nvmlEventSet_st *s)
{
    pthread_mutex_lock(&g_sets_lock);
    int destroy = --s->users == 0 && s->freed;
    pthread_mutex_unlock(&g_sets_lock);
    if (destroy)
        destroy_set(s);
}

static int set_is_freed(struct nvmlEventSet_st *s)
{
    pthread_mutex_lock(&g_sets_lock);
    int freed = s->freed;
    pthread_mutex_unlock(&g_sets_lock);
    return freed;
}

static int is_initialized(void)
{
    pthread_mutex_lock(&g_lock);
    int r = g_refcount > 0;
    pthread_mutex_unlock(&g_lock);
    return r;
}

static unsigned long long file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (unsigned long long)st.st_size : 0;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    if (!set)
        return NVML_ERROR_INVALID_ARGUMENT;
    struct nvmlEventSet_st *s = calloc(1, sizeof *s);
    if (!s)
        return NVML_ERROR_MEMORY;
    char dir[PATH_LEN];
    pthread_mutex_lock(&g_lock);
    if (g_refcount == 0) {
        pthread_mutex_unlock(&g_lock);
        free(s);
        return NVML_ERROR_UNINITIALIZED;
    }
    copy_str(s->path, sizeof s->path, g_events_path);
    copy_str(dir, sizeof dir, g_dir);
    pthread_mutex_unlock(&g_lock);
    pthread_mutex_init(&s->lock, NULL);
    s->offset = file_size(s->path); /* only events appended from now on */
    /* GPUSUP_FAKENVML_NO_INOTIFY=1 forces the sleep-polling fallback (for its tests). */
    const char *no_inotify = getenv("GPUSUP_FAKENVML_NO_INOTIFY");
    if (no_inotify && *no_inotify && *no_inotify != '0')
        s->inotify_fd = -1;
    else
        s->inotify_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (s->inotify_fd >= 0 &&
        inotify_add_watch(s->inotify_fd, dir, IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE) < 0) {
        close(s->inotify_fd);
        s->inotify_fd = -1;
    }
    pthread_mutex_lock(&g_sets_lock);
    s->next = g_sets;
    g_sets = s;
    pthread_mutex_unlock(&g_sets_lock);
    *set = s;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    struct nvmlEventSet_st *found = NULL;
    int destroy = 0;
    pthread_mutex_lock(&g_sets_lock);
    for (struct nvmlEventSet_st **pp = &g_sets; *pp; pp = &(*pp)->next) {
        if (*pp == set) {
            found = *pp;
            *pp = found->next;
            found->freed = 1;
            destroy = found->users == 0; /* else the last waiter destroys it */
            break;
        }
    }
    pthread_mutex_unlock(&g_sets_lock);
    if (!found)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (destroy)
        destroy_set(found);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes, nvmlEventSet_t set)
{
    unsigned int idx = 0;
    BEGIN("nvmlDeviceRegisterEvents", device, &idx)
    if (eventTypes & ~g->supported_events) {
        rc = NVML_ERROR_NOT_SUPPORTED;
        goto out;
    }
    {
        struct nvmlEventSet_st *s = acquire_set(set);
        if (!s) {
            rc = NVML_ERROR_INVALID_ARGUMENT;
            goto out;
        }
        unsigned long long size = file_size(s->path);
        pthread_mutex_lock(&s->lock);
        if (s->mask[idx] == 0)
            s->reg_offset[idx] = size;
        s->mask[idx] |= eventTypes;
        pthread_mutex_unlock(&s->lock);
        release_set(s);
    }
    END
}

/* Append newly written bytes of the events file to s->buf.  Returns the
 * number of bytes read (0: nothing new).  s->lock held. */
static size_t read_more_locked(struct nvmlEventSet_st *s)
{
    if (!s->buf) {
        s->buf = malloc(EVENT_BUF_CAP);
        if (!s->buf)
            return 0;
    }
    if (s->buf_pos > 0) {
        memmove(s->buf, s->buf + s->buf_pos, s->buf_len - s->buf_pos);
        s->buf_len -= s->buf_pos;
        s->buf_pos = 0;
    }
    if (s->buf_len == EVENT_BUF_CAP)
        s->buf_len = 0; /* a line longer than the buffer: drop it */
    int fd = open(s->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    struct stat st;
    size_t got = 0;
    if (fstat(fd, &st) == 0) {
        unsigned long long size = (unsigned long long)st.st_size;
        if (size < s->offset) {
            /* Truncated or replaced: everything in the new file is new. */
            s->offset = 0;
            s->buf_len = 0;
            memset(s->reg_offset, 0, sizeof s->reg_offset);
        }
        if (size > s->offset) {
            ssize_t r;
            do
                r = pread(fd, s->buf + s->buf_len, EVENT_BUF_CAP - s->buf_len, (off_t)s->offset);
            while (r < 0 && errno == EINTR);
            if (r > 0) {
                got = (size_t)r;
                s->buf_len += got;
                s->offset += got;
            }
        }
    }
    close(fd);
    return got;
}

/* Parse one complete line from s->buf into the pending slot if it is an
 * event for a GPU registered on this set.  Returns 0 when no complete line
 * is buffered.  s->lock held. */
static int parse_line_locked(struct nvmlEventSet_st *s)
{
    char *start = s->buf + s->buf_pos;
    char *nl = memchr(start, '\n', s->buf_len - s->buf_pos);
    if (!nl)
        return 0;
    size_t n = (size_t)(nl - start);
    unsigned long long line_offset = s->offset - (s->buf_len - s->buf_pos);
    s->buf_pos += n + 1;
    char line[256];
    if (n >= sizeof line)
        return 1;
    memcpy(line, start, n);
    line[n] = '\0';
    char *save = NULL;
    char *tok[6];
    int nt = 0;
    for (char *t = strtok_r(line, " \t\r", &save); t && nt < 6; t = strtok_r(NULL, " \t\r", &save))
        tok[nt++] = t;
    if (nt == 0 || tok[0][0] == '#')
        return 1;
    unsigned long long gpu, type, data, count = 1;
    int base;
    if (strcmp(tok[0], "xid") == 0 && (nt == 3 || nt == 4)) {
        type = EVENT_TYPE_XID;
        base = 2;
        if (!parse_u64(tok[2], &data))
            return 1;
    } else if (strcmp(tok[0], "event") == 0 && (nt == 4 || nt == 5)) {
        base = 3;
        if (!parse_u64(tok[2], &type) || !parse_u64(tok[3], &data))
            return 1;
    } else {
        return 1;
    }
    if (!parse_u64(tok[1], &gpu) || gpu >= MAX_GPUS)
        return 1;
    if (nt > base + 1 && !parse_u64(tok[base + 1], &count))
        return 1;
    if (count == 0 || !(s->mask[gpu] & type) || line_offset < s->reg_offset[gpu])
        return 1;
    s->pend_gpu = (unsigned int)gpu;
    s->pend_type = type;
    s->pend_data = data;
    s->pend_count = count;
    return 1;
}

static int next_event_locked(struct nvmlEventSet_st *s, nvmlEventData_t *data)
{
    for (;;) {
        if (s->pend_count > 0) {
            s->pend_count--;
            data->device = &g_devices[s->pend_gpu];
            data->eventType = s->pend_type;
            data->eventData = s->pend_data;
            data->gpuInstanceId = 0xffffffffU;
            data->computeInstanceId = 0xffffffffU;
            return 1;
        }
        if (s->buf && parse_line_locked(s))
            continue;
        if (read_more_locked(s) == 0)
            return 0;
    }
}

/* Block (no lock held) until the state directory changes or ms elapse. */
static void wait_for_change(struct nvmlEventSet_st *s, long long ms)
{
    if (s->inotify_fd < 0) {
        sleep_us((ms < FALLBACK_SLEEP_MS ? ms : FALLBACK_SLEEP_MS) * 1000LL);
        return;
    }
    struct pollfd pfd = { .fd = s->inotify_fd, .events = POLLIN, .revents = 0 };
    if (poll(&pfd, 1, (int)ms) > 0) {
        char drain[4096];
        while (read(s->inotify_fd, drain, sizeof drain) > 0) {
        }
    }
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    if (!data)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!is_initialized())
        return NVML_ERROR_UNINITIALIZED;
    struct nvmlEventSet_st *s = acquire_set(set);
    if (!s)
        return NVML_ERROR_INVALID_ARGUMENT;
    long long deadline = now_us() + (long long)timeoutms * 1000LL;
    nvmlReturn_t rc;
    for (;;) {
        pthread_mutex_lock(&s->lock);
        int got = next_event_locked(s, data);
        pthread_mutex_unlock(&s->lock);
        if (got) {
            rc = NVML_SUCCESS;
            break;
        }
        if (!is_initialized()) {
            rc = NVML_ERROR_UNINITIALIZED;
            break;
        }
        if (set_is_freed(s)) {
            rc = NVML_ERROR_INVALID_ARGUMENT;
            break;
        }
        long long left_ms = (deadline - now_us() + 999) / 1000; /* round up: never time out early */
        if (left_ms <= 0) {
            rc = NVML_ERROR_TIMEOUT;
            break;
        }
        wait_for_change(s, left_ms < WAIT_SLICE_MS ? left_ms : WAIT_SLICE_MS);
    }
    release_set(s);
    return rc;
}
