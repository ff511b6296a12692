/*
 * An LD_PRELOAD library that records what becomes durable, for power-loss tests.
 *
 * Every durability point of a process under PL_ROOT is counted: fsync,
 * fdatasync, syncfs and sync, and each write through a descriptor opened
 * with O_SYNC or O_DSYNC (LMDB writes its meta page that way).  At each one
 * the library records, in the directory PL_LOG, what it makes durable:
 *
 *   F pid seq dev ino path   a file's whole content (data file pid.seq)
 *   D pid seq dev ino path   a directory's entries, "ino type name\n" each
 *   R pid seq dev ino off p  the bytes of one O_DSYNC write at offset off
 *
 * (sync and syncfs record every file and directory under PL_ROOT.)  When
 * PL_KILL_AT=N, the process kills itself with SIGKILL at point N, before
 * that point takes effect: what the log holds is then exactly what a power
 * loss at that moment keeps, under the strict POSIX model (tests/powerloss.py
 * builds that tree).  PL_KILL_AT=0 only counts.  The count is written to
 * PL_LOG/count.<pid> at every point.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FD 65536

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static long points;
static long kill_at;
static char root[4096];
static size_t rootlen;
static char logdir[4096];
static int logfd = -1;
static int active;
static unsigned char dsync_fd[MAX_FD];

static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_syncfs)(int);
static void (*real_sync)(void);
static int (*real_close)(int);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);

/* Our own I/O goes straight to the kernel: never through the wrappers below. */
static int sys_open(const char *path, int flags, mode_t mode)
{
    return (int)syscall(SYS_openat, AT_FDCWD, path, flags, mode);
}

static void write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = syscall(SYS_write, fd, p, len);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            return;
        }
        p += n;
        len -= (size_t)n;
    }
}

__attribute__((constructor)) static void pl_init(void)
{
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_syncfs = dlsym(RTLD_NEXT, "syncfs");
    real_sync = dlsym(RTLD_NEXT, "sync");
    real_close = dlsym(RTLD_NEXT, "close");
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_writev = dlsym(RTLD_NEXT, "writev");
    real_pwritev = dlsym(RTLD_NEXT, "pwritev");
    const char *r = getenv("PL_ROOT"), *l = getenv("PL_LOG"), *k = getenv("PL_KILL_AT");
    if (!r || !l)
        return;
    snprintf(root, sizeof root, "%s", r);
    rootlen = strlen(root);
    while (rootlen > 1 && root[rootlen - 1] == '/')
        root[--rootlen] = 0;
    snprintf(logdir, sizeof logdir, "%s", l);
    kill_at = k ? atol(k) : 0;
    char path[4200];
    snprintf(path, sizeof path, "%s/events", logdir);
    logfd = sys_open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    active = logfd >= 0;
}

/* The path of an open descriptor if it lies under PL_ROOT (deleted files included). */
static int tracked(int fd, char *out, size_t outlen)
{
    if (!active || fd < 0)
        return 0;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, outlen - 1);
    if (n <= 0)
        return 0;
    out[n] = 0;
    if (strncmp(out, root, rootlen) != 0 || (out[rootlen] != 0 && out[rootlen] != '/'))
        return 0;
    return 1;
}

static void data_path(char *out, size_t len, long seq, int part)
{
    snprintf(out, len, "%s/%d.%ld.%d", logdir, (int)getpid(), seq, part);
}

static void log_line(char kind, long seq, int part, const struct stat *st, long long off,
                     const char *path)
{
    char line[4400];
    int n = snprintf(line, sizeof line, "%c %d %ld %d %llu %llu %lld %s\n", kind, (int)getpid(),
                     seq, part, (unsigned long long)st->st_dev, (unsigned long long)st->st_ino,
                     off, path);
    if (n > 0)
        write_all(logfd, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* Count one durability point; at PL_KILL_AT, die before it takes effect.  Holds mu. */
static long point(void)
{
    points++;
    char path[4200], num[32];
    snprintf(path, sizeof path, "%s/count.%d", logdir, (int)getpid());
    int fd = sys_open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd >= 0) {
        int n = snprintf(num, sizeof num, "%ld\n", points);
        write_all(fd, num, (size_t)n);
        syscall(SYS_close, fd);
    }
    if (kill_at > 0 && points == kill_at) {
        kill(getpid(), SIGKILL);
        for (;;)
            pause();
    }
    return points;
}

static void copy_fd(int from, int to)
{
    char buf[1 << 16];
    for (;;) {
        ssize_t n = syscall(SYS_read, from, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        write_all(to, buf, (size_t)n);
    }
}

static void record_file_path(const char *src, const struct stat *st, long seq, int part,
                             const char *shown)
{
    char dst[4200];
    data_path(dst, sizeof dst, seq, part);
    int in = sys_open(src, O_RDONLY | O_CLOEXEC, 0);
    int out = sys_open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (in >= 0 && out >= 0)
        copy_fd(in, out);
    if (in >= 0)
        syscall(SYS_close, in);
    if (out >= 0)
        syscall(SYS_close, out);
    log_line('F', seq, part, st, 0, shown);
}

static void record_dir_fd(int dirfd, const struct stat *st, long seq, int part, const char *shown)
{
    char dst[4200];
    data_path(dst, sizeof dst, seq, part);
    int out = sys_open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int own = (int)syscall(SYS_openat, dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    DIR *d = own >= 0 ? fdopendir(own) : NULL;
    if (d && out >= 0) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            struct stat cst;
            if (fstatat(own, e->d_name, &cst, AT_SYMLINK_NOFOLLOW) != 0)
                continue;
            char type = S_ISDIR(cst.st_mode) ? 'd' : S_ISREG(cst.st_mode) ? 'f' : 'o';
            char line[600];
            int n = snprintf(line, sizeof line, "%llu %c %s\n", (unsigned long long)cst.st_ino,
                             type, e->d_name);
            if (n > 0 && (size_t)n < sizeof line)
                write_all(out, line, (size_t)n);
        }
    }
    if (d)
        closedir(d);
    else if (own >= 0)
        syscall(SYS_close, own);
    if (out >= 0)
        syscall(SYS_close, out);
    log_line('D', seq, part, st, 0, shown);
}

/* What fsync(fd) makes durable: the file's content, or the directory's entries. */
static void record_fd(int fd, long seq, const char *shown)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return;
    if (S_ISDIR(st.st_mode)) {
        record_dir_fd(fd, &st, seq, 0, shown);
    } else if (S_ISREG(st.st_mode)) {
        char src[64];
        snprintf(src, sizeof src, "/proc/self/fd/%d", fd);
        record_file_path(src, &st, seq, 0, shown);
    }
}

static long walk_seq;
static int walk_part;

static int walk_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)ftw;
    if (flag == FTW_D) {
        int fd = sys_open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
        if (fd >= 0) {
            record_dir_fd(fd, st, walk_seq, walk_part++, path);
            syscall(SYS_close, fd);
        }
    } else if (flag == FTW_F && S_ISREG(st->st_mode)) {
        record_file_path(path, st, walk_seq, walk_part++, path);
    }
    return 0;
}

/* sync and syncfs: everything under PL_ROOT is durable. */
static void everything(void)
{
    if (!active)
        return;
    pthread_mutex_lock(&mu);
    walk_seq = point();
    walk_part = 0;
    nftw(root, walk_one, 32, FTW_PHYS);
    pthread_mutex_unlock(&mu);
}

static int synced(int fd, int (*real)(int))
{
    char path[4096];
    if (!tracked(fd, path, sizeof path))
        return real(fd);
    pthread_mutex_lock(&mu);
    long seq = point();
    record_fd(fd, seq, path);
    int rc = real(fd);
    pthread_mutex_unlock(&mu);
    return rc;
}

int fsync(int fd) { return synced(fd, real_fsync); }
int fdatasync(int fd) { return synced(fd, real_fdatasync); }

int syncfs(int fd)
{
    everything();
    return real_syncfs(fd);
}

void sync(void)
{
    everything();
    real_sync();
}

static void opened(int fd, int flags)
{
    if (fd >= 0 && fd < MAX_FD)
        dsync_fd[fd] = (flags & (O_SYNC | O_DSYNC)) != 0;
}

static mode_t mode_arg(int flags, va_list ap)
{
    int wants_mode = (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE;
    return wants_mode ? (mode_t)va_arg(ap, int) : 0;
}

/* One body for open, open64, openat and openat64: the optional leading parameters
 * (``int dirfd,`` for the openat pair) come last, and ``dirfd`` is what reaches openat. */
#define OPEN_WRAPPER(name, dirfd, ...)                                                         \
    int name(__VA_ARGS__ const char *path, int flags, ...)                                     \
    {                                                                                          \
        va_list ap;                                                                            \
        va_start(ap, flags);                                                                   \
        mode_t mode = mode_arg(flags, ap);                                                     \
        va_end(ap);                                                                            \
        int fd = (int)syscall(SYS_openat, dirfd, path, flags, mode);                           \
        opened(fd, flags);                                                                     \
        return fd;                                                                             \
    }
OPEN_WRAPPER(open, AT_FDCWD)
OPEN_WRAPPER(open64, AT_FDCWD)
OPEN_WRAPPER(openat, dirfd, int dirfd,)
OPEN_WRAPPER(openat64, dirfd, int dirfd,)

int close(int fd)
{
    if (fd >= 0 && fd < MAX_FD)
        dsync_fd[fd] = 0;
    return real_close(fd);
}

/* Checked with F_GETFL too: a descriptor number may have been reused behind our back. */
static int is_dsync(int fd)
{
    if (!active || fd < 0 || fd >= MAX_FD || !dsync_fd[fd])
        return 0;
    int fl = fcntl(fd, F_GETFL);
    return fl >= 0 && (fl & O_DSYNC) != 0;
}

/* A write through an O_DSYNC descriptor: durable when it returns, that range only. */
static ssize_t dsync_write(int fd, const struct iovec *iov, int cnt, off_t off, int positional)
{
    char path[4096];
    if (!tracked(fd, path, sizeof path)) {
        return positional ? real_pwritev(fd, iov, cnt, off) : real_writev(fd, iov, cnt);
    }
    pthread_mutex_lock(&mu);
    long seq = point();
    if (!positional)
        off = lseek(fd, 0, SEEK_CUR);
    ssize_t n = positional ? real_pwritev(fd, iov, cnt, off) : real_writev(fd, iov, cnt);
    if (n > 0) {
        struct stat st;
        if (fstat(fd, &st) == 0) {
            char dst[4200];
            data_path(dst, sizeof dst, seq, 0);
            int out = sys_open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
            size_t left = (size_t)n;
            for (int i = 0; i < cnt && left > 0 && out >= 0; i++) {
                size_t take = iov[i].iov_len < left ? iov[i].iov_len : left;
                write_all(out, iov[i].iov_base, take);
                left -= take;
            }
            if (out >= 0)
                syscall(SYS_close, out);
            log_line('R', seq, 0, &st, (long long)off, path);
        }
    }
    pthread_mutex_unlock(&mu);
    return n;
}

ssize_t write(int fd, const void *buf, size_t len)
{
    if (!is_dsync(fd))
        return real_write(fd, buf, len);
    struct iovec v = {(void *)buf, len};
    return dsync_write(fd, &v, 1, 0, 0);
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off)
{
    if (!is_dsync(fd))
        return real_pwrite(fd, buf, len, off);
    struct iovec v = {(void *)buf, len};
    return dsync_write(fd, &v, 1, off, 1);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off)
{
    if (!is_dsync(fd))
        return real_pwrite64(fd, buf, len, off);
    struct iovec v = {(void *)buf, len};
    return dsync_write(fd, &v, 1, off, 1);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
    if (!is_dsync(fd))
        return real_writev(fd, iov, cnt);
    return dsync_write(fd, iov, cnt, 0, 0);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
    if (!is_dsync(fd))
        return real_pwritev(fd, iov, cnt, off);
    return dsync_write(fd, iov, cnt, off, 1);
}
