/*
 * probe.c - vmferry in-guest workload helper.
 *
 * Build: gcc -static -O2 -Wall -o probe probe.c
 *
 * Usage: probe [options] ROLE[,ROLE...] [ROLE=ARG ...]
 *   roles: heartbeat udpecho tcpecho dirty[=SIZE@RATE] disk[=PATH] power
 *   --port N          UDP/TCP echo port (default 7)
 *   --bind ADDR       IPv4 address to bind the echo sockets to (default 0.0.0.0)
 *   --disk PATH       block device for the disk role (default /dev/vda)
 *   --disk-file PATH  regular file for the disk role (size taken from fstat)
 *   --dirty SPEC      dirtier working set and rate, e.g. 128M@0 or 32M@50M; one
 *                     byte per page changes each round, or with ":full" appended
 *                     (128M@0:full) every byte of every page gets fresh data
 *   --hb-ms N         heartbeat period in ms (default 500)
 *   --ack-ms N        minimum ms between FERRY-DISK-ACK lines (default 250)
 *   --disk-pace-us N  pause between disk blocks in us (default 2000)
 *   udpecho also answers "STAT" (counters) and "MARK <text>" (fills 4 MiB with <text>)
 *   --once-verify     verify the disk/file, print FERRY-DISK-VERIFY, exit
 *                     (exit 0 = clean, 3 = gaps or corrupt blocks, 1 = error)
 *   --guest           really power the machine off in the power role; without
 *                     it the role only prints FERRY-POWEROFF and the probe exits
 *
 * Each role runs in its own forked child; counters shared through a
 * MAP_SHARED|MAP_ANONYMOUS page created before forking. A role that dies is
 * restarted after one second. Output lines go to stdout with one write(2)
 * each, so lines from different roles never interleave.
 *
 * Disk block layout (4096 bytes, little endian):
 *   [0,8) "FERRYBLK"  [8,16) seq  [16,20) crc32(bytes [8,16) + [20,4096))
 *   [20,4096) payload = splitmix64 stream seeded by seq
 * Sequence s >= 1 lives at block index (s - 1) % nblocks.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/input.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BLK 4096u
#define HDR_MAGIC "FERRYBLK"
#define PAYLOAD_OFF 20u
#define EXIT_POWEROFF 100
#define EXIT_DIRTY 3
#define MAX_ROLES 16
#define MAX_CLIENTS 1000
#define CLIENT_BUF 16384
#define MAX_INPUTS 32

struct shared {
	uint64_t hb;
	uint64_t disk_ack;
	uint64_t dirty_rounds;
};

struct opts {
	int port;
	const char *bind;
	const char *disk;
	int disk_is_file;
	const char *dirty;
	unsigned hb_ms;
	unsigned ack_ms;
	unsigned disk_pace_us;
	int once_verify;
	int guest;
};

enum role { R_HEARTBEAT, R_UDPECHO, R_TCPECHO, R_DIRTY, R_DISK, R_POWER, R_COUNT };
static const char *const role_names[R_COUNT] = {
	"heartbeat", "udpecho", "tcpecho", "dirty", "disk", "power",
};

static struct shared *g_sh;
static uint32_t crc_table[256];
static volatile sig_atomic_t g_stop;

/* ---------- small helpers ---------- */

static uint64_t now_ns(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ms(clockid_t clk) { return now_ns(clk) / 1000000ull; }

static void sleep_ns(uint64_t ns)
{
	struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000ull),
			       .tv_nsec = (long)(ns % 1000000000ull) };
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

static void sleep_until(const struct timespec *deadline)
{
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, deadline, NULL) == EINTR)
		;
}

static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Print one line to stdout with a single write(2). */
__attribute__((format(printf, 1, 2))) static void emit(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof buf)
		n = (int)sizeof buf - 1;
	(void)write_all(STDOUT_FILENO, buf, (size_t)n);
}

__attribute__((format(printf, 1, 2))) static void warnx(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof buf)
		n = (int)sizeof buf - 1;
	(void)write_all(STDERR_FILENO, buf, (size_t)n);
}

static uint64_t sh_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static void sh_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

static uint32_t crc_update(uint32_t crc, const uint8_t *p, size_t n)
{
	crc = ~crc;
	while (n--)
		crc = crc_table[(crc ^ *p++) & 0xffu] ^ (crc >> 8);
	return ~crc;
}

static void put_le64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

static void put_le32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Parse "128M", "4k", "1G", "0" into bytes (binary suffixes). */
static int parse_size(const char *s, uint64_t *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -1;
	uint64_t mul = 1;
	switch (*end) {
	case '\0': break;
	case 'k': case 'K': mul = 1ull << 10; end++; break;
	case 'm': case 'M': mul = 1ull << 20; end++; break;
	case 'g': case 'G': mul = 1ull << 30; end++; break;
	default: return -1;
	}
	if (*end == 'i')
		end++;
	if (*end == 'B' || *end == 'b')
		end++;
	if (*end != '\0')
		return -1;
	*out = (uint64_t)v * mul;
	return 0;
}

static int parse_uint(const char *s, unsigned max, unsigned *out)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || end == s || *end != '\0' || v > max)
		return -1;
	*out = (unsigned)v;
	return 0;
}

/* ---------- heartbeat ---------- */

static int role_heartbeat(const struct opts *o)
{
	uint64_t n = sh_load(&g_sh->hb);
	const uint64_t period = (uint64_t)o->hb_ms * 1000000ull;
	struct timespec next;
	clock_gettime(CLOCK_MONOTONIC, &next);
	for (;;) {
		n++;
		sh_store(&g_sh->hb, n);
		emit("FERRY-HB %llu %llu\n", (unsigned long long)n,
		     (unsigned long long)now_ms(CLOCK_MONOTONIC));
		uint64_t due = (uint64_t)next.tv_sec * 1000000000ull + (uint64_t)next.tv_nsec + period;
		uint64_t now = now_ns(CLOCK_MONOTONIC);
		if (now > due + period) /* fell far behind (VM paused): do not burst */
			due = now + period;
		next.tv_sec = (time_t)(due / 1000000000ull);
		next.tv_nsec = (long)(due % 1000000000ull);
		sleep_until(&next);
	}
	return 0; /* not reached */
}

/* ---------- echo servers ---------- */

static int open_listener(const struct opts *o, int type)
{
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof sa);
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)o->port);
	if (inet_pton(AF_INET, o->bind, &sa.sin_addr) != 1) {
		warnx("probe: bad bind address %s\n", o->bind);
		return -1;
	}
	int fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		warnx("probe: socket: %s\n", strerror(errno));
		return -1;
	}
	int one = 1;
	(void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		warnx("probe: bind %s:%d: %s\n", o->bind, o->port, strerror(errno));
		close(fd);
		return -1;
	}
	if (type == SOCK_STREAM && listen(fd, 128) < 0) {
		warnx("probe: listen: %s\n", strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

/*
 * "MARK <text>" (udpecho): keep <text> in guest memory, repeated over MARK_BYTES, until the
 * next MARK replaces it. Tests look for it in captures of the migration link.
 */
#define MARK_BYTES (4u << 20)

static size_t mark_memory(const uint8_t *text, size_t len)
{
	static volatile uint8_t *mark;
	if (len == 0)
		return 0;
	if (!mark) {
		void *m = mmap(NULL, MARK_BYTES, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (m == MAP_FAILED)
			return 0;
		mark = m;
	}
	for (size_t i = 0; i < MARK_BYTES; i++)
		mark[i] = text[i % len];
	return MARK_BYTES;
}

static int role_udpecho(const struct opts *o)
{
	int fd = open_listener(o, SOCK_DGRAM);
	if (fd < 0)
		return 1;
	static uint8_t buf[65536];
	for (;;) {
		struct sockaddr_storage peer;
		socklen_t plen = sizeof peer;
		ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &plen);
		if (n < 0) {
			if (errno != EINTR)
				sleep_ns(10000000ull); /* transient error: avoid spinning */
			continue;
		}
		const void *reply = buf;
		size_t rlen = (size_t)n;
		char stat[256];
		if (n > 5 && memcmp(buf, "MARK ", 5) == 0) {
			size_t filled = mark_memory(buf + 5, (size_t)n - 5);
			int k = snprintf(stat, sizeof stat, "MARKED %zu", filled);
			reply = stat;
			rlen = (size_t)k;
		} else if (n >= 4 && memcmp(buf, "STAT", 4) == 0) {
			int k = snprintf(stat, sizeof stat,
					 "STAT hb=%llu disk_ack=%llu dirty_rounds=%llu uptime_ms=%llu",
					 (unsigned long long)sh_load(&g_sh->hb),
					 (unsigned long long)sh_load(&g_sh->disk_ack),
					 (unsigned long long)sh_load(&g_sh->dirty_rounds),
					 (unsigned long long)now_ms(CLOCK_BOOTTIME));
			reply = stat;
			rlen = (size_t)k;
		}
		while (sendto(fd, reply, rlen, 0, (struct sockaddr *)&peer, plen) < 0 &&
		       errno == EINTR)
			;
	}
}

struct client {
	int fd;
	size_t len, off;
	uint8_t buf[CLIENT_BUF];
};

static void client_close(struct client **c)
{
	close((*c)->fd);
	free(*c);
	*c = NULL;
}

/* Flush pending bytes; returns -1 if the client must be dropped. */
static int client_flush(struct client *c)
{
	while (c->off < c->len) {
		ssize_t n = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -1;
		}
		c->off += (size_t)n;
	}
	c->len = c->off = 0;
	return 0;
}

static int role_tcpecho(const struct opts *o)
{
	int lfd = open_listener(o, SOCK_STREAM);
	if (lfd < 0)
		return 1;
	(void)fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK);
	static struct client *cl[MAX_CLIENTS];
	static struct pollfd pfd[MAX_CLIENTS + 1];
	static int map[MAX_CLIENTS + 1];
	int ncl = 0;
	for (;;) {
		int np = 0;
		if (ncl < MAX_CLIENTS) {
			pfd[np].fd = lfd;
			pfd[np].events = POLLIN;
			map[np++] = -1;
		}
		for (int i = 0; i < MAX_CLIENTS; i++) {
			if (!cl[i])
				continue;
			pfd[np].fd = cl[i]->fd;
			pfd[np].events = cl[i]->off < cl[i]->len ? POLLOUT : POLLIN;
			map[np++] = i;
		}
		int r = poll(pfd, (nfds_t)np, -1);
		if (r < 0) {
			if (errno != EINTR)
				sleep_ns(10000000ull);
			continue;
		}
		for (int k = 0; k < np; k++) {
			if (!pfd[k].revents)
				continue;
			if (map[k] < 0) {
				for (;;) {
					int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
					if (cfd < 0) {
						if (errno == EINTR || errno == ECONNABORTED)
							continue;
						break;
					}
					int slot = -1;
					for (int i = 0; i < MAX_CLIENTS && slot < 0; i++)
						if (!cl[i])
							slot = i;
					struct client *c = slot >= 0 ? malloc(sizeof *c) : NULL;
					if (!c) {
						close(cfd);
						break;
					}
					int one = 1;
					(void)setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
					c->fd = cfd;
					c->len = c->off = 0;
					cl[slot] = c;
					ncl++;
				}
				continue;
			}
			struct client **c = &cl[map[k]];
			if ((*c)->off < (*c)->len) {
				if (client_flush(*c) < 0) {
					client_close(c);
					ncl--;
				}
				continue;
			}
			ssize_t n;
			do
				n = recv((*c)->fd, (*c)->buf, CLIENT_BUF, 0);
			while (n < 0 && errno == EINTR);
			if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
				continue;
			if (n <= 0) {
				client_close(c);
				ncl--;
				continue;
			}
			(*c)->len = (size_t)n;
			(*c)->off = 0;
			if (client_flush(*c) < 0) {
				client_close(c);
				ncl--;
			}
		}
	}
}

/* ---------- memory dirtier ---------- */

static int parse_dirty(const char *spec, uint64_t *size, uint64_t *rate, int *full)
{
	char tmp[64];
	if (strlen(spec) >= sizeof tmp)
		return -1;
	strcpy(tmp, spec);
	char *colon = strchr(tmp, ':');
	*full = 0;
	if (colon) {
		if (strcmp(colon + 1, "full"))
			return -1;
		*full = 1;
		*colon = '\0';
	}
	char *at = strchr(tmp, '@');
	*rate = 0;
	if (at) {
		*at = '\0';
		if (parse_size(at + 1, rate) < 0)
			return -1;
	}
	if (parse_size(tmp, size) < 0 || *size == 0)
		return -1;
	return 0;
}

static int role_dirty(const struct opts *o)
{
	uint64_t size, rate;
	int full;
	if (parse_dirty(o->dirty, &size, &rate, &full) < 0) {
		warnx("probe: bad dirty spec '%s' (want SIZE@RATE[:full], e.g. 128M@0)\n", o->dirty);
		return 2;
	}
	const size_t page = 4096, chunk = 64;
	size_t pages = (size_t)((size + page - 1) / page);
	volatile uint8_t *mem = mmap(NULL, pages * page, PROT_READ | PROT_WRITE,
				     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		warnx("probe: dirty: mmap %zu bytes: %s\n", pages * page, strerror(errno));
		return 1;
	}
	for (size_t i = 0; i < pages; i++)
		mem[i * page] = 1;
	emit("FERRY-DIRTY size=%llu rate=%llu\n", (unsigned long long)(pages * page),
	     (unsigned long long)rate);
	uint64_t round = sh_load(&g_sh->dirty_rounds);
	uint64_t t0 = now_ns(CLOCK_MONOTONIC), done = 0;
	for (;;) {
		uint8_t val = (uint8_t)(round + 2);
		for (size_t i = 0; i < pages; i += chunk) {
			size_t end = i + chunk < pages ? i + chunk : pages;
			if (full) {
				/* every word new each round: no delta encoding or compression helps */
				for (size_t j = i; j < end; j++) {
					volatile uint64_t *w = (volatile uint64_t *)(mem + j * page);
					uint64_t x = (round + 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t)j;
					for (size_t k = 0; k < page / 8; k++) {
						x ^= x << 13;
						x ^= x >> 7;
						x ^= x << 17;
						w[k] = x;
					}
				}
			} else {
				for (size_t j = i; j < end; j++)
					mem[j * page] = val;
			}
			if (!rate)
				continue;
			done += (uint64_t)(end - i) * page;
			uint64_t want = (uint64_t)((unsigned __int128)done * 1000000000u / rate);
			uint64_t el = now_ns(CLOCK_MONOTONIC) - t0;
			if (want > el) {
				sleep_ns(want - el);
			} else if (el - want > 1000000000ull) {
				/* more than 1 s behind (paused VM, slow CPU): rebase, no burst */
				t0 = now_ns(CLOCK_MONOTONIC);
				done = 0;
			}
		}
		round++;
		sh_store(&g_sh->dirty_rounds, round);
	}
}

/* ---------- disk writer / verifier ---------- */

struct verify {
	uint64_t last, gaps, corrupt, torn;
};

static void block_encode(uint8_t *b, uint64_t seq)
{
	memcpy(b, HDR_MAGIC, 8);
	put_le64(b + 8, seq);
	uint64_t x = seq;
	for (size_t off = PAYLOAD_OFF; off < BLK; off += 8) {
		uint64_t z = (x += 0x9E3779B97F4A7C15ull);
		z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
		z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
		z ^= z >> 31;
		uint8_t tmp[8];
		put_le64(tmp, z);
		size_t n = BLK - off < 8 ? BLK - off : 8;
		memcpy(b + off, tmp, n);
	}
	uint32_t crc = crc_update(0, b + 8, 8);
	crc = crc_update(crc, b + PAYLOAD_OFF, BLK - PAYLOAD_OFF);
	put_le32(b + 16, crc);
}

/* 0 = no header, 1 = valid, 2 = header present but bad crc */
static int block_check(const uint8_t *b, uint64_t *seq)
{
	if (memcmp(b, HDR_MAGIC, 8) != 0)
		return 0;
	*seq = get_le64(b + 8);
	uint32_t crc = crc_update(0, b + 8, 8);
	crc = crc_update(crc, b + PAYLOAD_OFF, BLK - PAYLOAD_OFF);
	return crc == get_le32(b + 16) ? 1 : 2;
}

static int disk_open(const struct opts *o, int rdonly, uint64_t *nblocks)
{
	int flags = (rdonly ? O_RDONLY : O_RDWR | O_SYNC) | O_CLOEXEC;
	int fd = -1;
	/* The block device node may appear shortly after virtio_blk loads. */
	for (int tries = 0; tries < 100; tries++) {
		fd = open(o->disk, flags);
		if (fd >= 0 || o->disk_is_file || (errno != ENOENT && errno != ENXIO))
			break;
		sleep_ns(200000000ull);
	}
	if (fd < 0) {
		warnx("probe: open %s: %s\n", o->disk, strerror(errno));
		return -1;
	}
	struct stat st;
	uint64_t size = 0;
	if (fstat(fd, &st) < 0) {
		warnx("probe: fstat %s: %s\n", o->disk, strerror(errno));
		close(fd);
		return -1;
	}
	if (S_ISBLK(st.st_mode)) {
		if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
			warnx("probe: BLKGETSIZE64 %s: %s\n", o->disk, strerror(errno));
			close(fd);
			return -1;
		}
	} else if (S_ISREG(st.st_mode)) {
		size = (uint64_t)st.st_size;
	} else {
		warnx("probe: %s is neither a block device nor a regular file\n", o->disk);
		close(fd);
		return -1;
	}
	*nblocks = size / BLK;
	if (*nblocks == 0) {
		warnx("probe: %s is smaller than one block\n", o->disk);
		close(fd);
		return -1;
	}
	return fd;
}

static int disk_verify(int fd, uint64_t nblocks, struct verify *r)
{
	const size_t batch = 256;
	uint8_t *buf = malloc(batch * BLK);
	uint64_t *seqs = calloc(nblocks, sizeof *seqs);
	uint8_t *state = calloc(nblocks, 1);
	if (!buf || !seqs || !state) {
		warnx("probe: verify: out of memory\n");
		free(buf), free(seqs), free(state);
		return -1;
	}
	for (uint64_t i = 0; i < nblocks; i += batch) {
		size_t cnt = nblocks - i < batch ? (size_t)(nblocks - i) : batch;
		size_t want = cnt * BLK, got = 0;
		while (got < want) {
			ssize_t n = pread(fd, buf + got, want - got, (off_t)(i * BLK + got));
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				warnx("probe: verify: read at block %llu: %s\n",
				      (unsigned long long)i, n < 0 ? strerror(errno) : "short read");
				free(buf), free(seqs), free(state);
				return -1;
			}
			got += (size_t)n;
		}
		for (size_t k = 0; k < cnt; k++)
			state[i + k] = (uint8_t)block_check(buf + k * BLK, &seqs[i + k]);
	}
	memset(r, 0, sizeof *r);
	for (uint64_t i = 0; i < nblocks; i++)
		if (state[i] == 1 && seqs[i] >= 1 && (seqs[i] - 1) % nblocks == i && seqs[i] > r->last)
			r->last = seqs[i];
	const uint64_t m = r->last, torn_idx = m % nblocks;
	r->torn = state[torn_idx] == 2;
	uint64_t first = m >= nblocks ? m - nblocks + 1 : 1;
	for (uint64_t s = first; m >= 1 && s <= m; s++) {
		uint64_t idx = (s - 1) % nblocks;
		if (state[idx] == 1 && seqs[idx] == s)
			continue;
		if (state[idx] == 2) {
			if (idx != torn_idx)
				r->corrupt++;
		} else {
			r->gaps++;
		}
	}
	free(buf), free(seqs), free(state);
	return 0;
}

static void print_verify(const struct verify *v)
{
	emit("FERRY-DISK-VERIFY last=%llu gaps=%llu corrupt=%llu torn=%llu\n",
	     (unsigned long long)v->last, (unsigned long long)v->gaps,
	     (unsigned long long)v->corrupt, (unsigned long long)v->torn);
}

static int verify_only(const struct opts *o)
{
	uint64_t nblocks;
	int fd = disk_open(o, 1, &nblocks);
	if (fd < 0)
		return 1;
	struct verify v;
	int rc = disk_verify(fd, nblocks, &v);
	close(fd);
	if (rc < 0)
		return 1;
	print_verify(&v);
	return (v.gaps || v.corrupt) ? EXIT_DIRTY : 0;
}

static int role_disk(const struct opts *o)
{
	uint64_t nblocks;
	int fd = disk_open(o, 0, &nblocks);
	if (fd < 0)
		return 1;
	struct verify v;
	if (disk_verify(fd, nblocks, &v) < 0)
		return 1;
	print_verify(&v);
	uint8_t *buf;
	if (posix_memalign((void **)&buf, BLK, BLK) != 0)
		return 1;
	uint64_t last_print = 0;
	for (uint64_t s = v.last + 1;; s++) {
		block_encode(buf, s);
		off_t off = (off_t)(((s - 1) % nblocks) * BLK);
		for (;;) {
			ssize_t n = pwrite(fd, buf, BLK, off);
			if (n == (ssize_t)BLK)
				break;
			if (n < 0 && errno == EINTR)
				continue;
			emit("FERRY-DISK-ERROR seq=%llu err=%s\n", (unsigned long long)s,
			     n < 0 ? strerror(errno) : "short write");
			sleep_ns(1000000000ull); /* retry the same seq; never skip one */
		}
		sh_store(&g_sh->disk_ack, s);
		uint64_t now = now_ms(CLOCK_MONOTONIC);
		if (last_print == 0 || now - last_print >= o->ack_ms) {
			emit("FERRY-DISK-ACK %llu\n", (unsigned long long)s);
			last_print = now ? now : 1;
		}
		if (o->disk_pace_us)
			sleep_ns((uint64_t)o->disk_pace_us * 1000ull);
	}
}

/* ---------- power button ---------- */

static void power_off(const struct opts *o)
{
	emit("FERRY-POWEROFF\n");
	/* In the guest, stop every other process (the disk writer above all) before the
	 * kernel shuts devices down; kill(-1) spares PID 1 and the caller. */
	if (o->guest) {
		prctl(PR_SET_PDEATHSIG, 0); /* survive the supervisor's death below */
		kill(-1, SIGKILL);
	}
	sync();
	if (o->guest) {
		reboot(RB_POWER_OFF);
		warnx("probe: reboot(RB_POWER_OFF): %s\n", strerror(errno));
	}
	_exit(EXIT_POWEROFF);
}

static int role_power(const struct opts *o)
{
	struct pollfd pfd[MAX_INPUTS];
	char names[MAX_INPUTS][64];
	int n = 0;
	for (;;) {
		DIR *d = opendir("/dev/input");
		struct dirent *de;
		while (d && (de = readdir(d)) != NULL && n < MAX_INPUTS) {
			if (strncmp(de->d_name, "event", 5) != 0 || strlen(de->d_name) >= 32)
				continue;
			int known = 0;
			for (int i = 0; i < n && !known; i++)
				known = strcmp(names[i], de->d_name) == 0;
			if (known)
				continue;
			char path[96];
			snprintf(path, sizeof path, "/dev/input/%s", de->d_name);
			int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
			if (fd < 0)
				continue;
			snprintf(names[n], sizeof names[n], "%s", de->d_name);
			pfd[n].fd = fd;
			pfd[n].events = POLLIN;
			n++;
		}
		if (d)
			closedir(d);
		/* Wake every 2 s to pick up input devices that appear later. */
		int r = poll(pfd, (nfds_t)n, 2000);
		if (r <= 0)
			continue;
		for (int i = 0; i < n; i++) {
			if (!pfd[i].revents)
				continue;
			struct input_event ev[16];
			ssize_t got = read(pfd[i].fd, ev, sizeof ev);
			if (got < 0 && (errno == EINTR || errno == EAGAIN))
				continue;
			if (got <= 0) { /* device went away */
				close(pfd[i].fd);
				pfd[i] = pfd[n - 1];
				memcpy(names[i], names[n - 1], sizeof names[i]);
				n--;
				i--;
				continue;
			}
			for (size_t k = 0; k < (size_t)got / sizeof ev[0]; k++)
				if (ev[k].type == EV_KEY && ev[k].code == KEY_POWER && ev[k].value == 1)
					power_off(o);
		}
	}
	return 0; /* not reached */
}

/* ---------- supervisor ---------- */

static int run_role(enum role r, const struct opts *o)
{
	switch (r) {
	case R_HEARTBEAT: return role_heartbeat(o);
	case R_UDPECHO: return role_udpecho(o);
	case R_TCPECHO: return role_tcpecho(o);
	case R_DIRTY: return role_dirty(o);
	case R_DISK: return role_disk(o);
	case R_POWER: return role_power(o);
	default: return 2;
	}
}

static pid_t spawn(enum role r, const struct opts *o)
{
	pid_t parent = getpid();
	pid_t pid = fork();
	if (pid != 0)
		return pid;
	signal(SIGTERM, SIG_DFL);
	signal(SIGINT, SIG_DFL);
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != parent)
		_exit(1);
	_exit(run_role(r, o));
}

static void on_stop(int sig)
{
	(void)sig;
	g_stop = 1;
}

static void usage(void)
{
	warnx("usage: probe [--port N] [--bind ADDR] [--disk DEV | --disk-file PATH]\n"
	      "             [--dirty SIZE@RATE] [--hb-ms N] [--ack-ms N] [--disk-pace-us N]\n"
	      "             [--guest] [--once-verify] ROLE[,ROLE...] [dirty=SPEC] [disk=PATH]\n"
	      "roles: heartbeat udpecho tcpecho dirty disk power\n");
}

static int add_role(const char *tok, struct opts *o, int *roles, int *nroles)
{
	char name[32];
	const char *eq = strchr(tok, '=');
	size_t len = eq ? (size_t)(eq - tok) : strlen(tok);
	if (len == 0)
		return 0;
	if (len >= sizeof name)
		return -1;
	memcpy(name, tok, len);
	name[len] = '\0';
	for (int r = 0; r < R_COUNT; r++) {
		if (strcmp(name, role_names[r]) != 0)
			continue;
		if (eq && r == R_DIRTY) {
			o->dirty = eq + 1;
		} else if (eq && r == R_DISK) {
			o->disk = eq + 1;
			o->disk_is_file = 0;
		} else if (eq) {
			return -1;
		}
		for (int i = 0; i < *nroles; i++)
			if (roles[i] == r)
				return 0;
		if (*nroles < MAX_ROLES)
			roles[(*nroles)++] = r;
		return 0;
	}
	return -1;
}

int main(int argc, char **argv)
{
	struct opts o = {
		.port = 7, .bind = "0.0.0.0", .disk = "/dev/vda", .dirty = "64M@0",
		.hb_ms = 500, .ack_ms = 250, .disk_pace_us = 2000,
	};
	int roles[MAX_ROLES], nroles = 0;
	crc_init();
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *val = NULL;
		if (strncmp(a, "--", 2) == 0) {
			const char *eq = strchr(a, '=');
			char key[32];
			size_t klen = eq ? (size_t)(eq - a) : strlen(a);
			if (klen >= sizeof key) {
				usage();
				return 2;
			}
			memcpy(key, a, klen);
			key[klen] = '\0';
			int needs = strcmp(key, "--once-verify") && strcmp(key, "--guest") &&
				    strcmp(key, "--help");
			if (needs) {
				val = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
				if (!val) {
					warnx("probe: %s needs a value\n", key);
					return 2;
				}
			}
			unsigned u;
			if (!strcmp(key, "--port") && !parse_uint(val, 65535, &u)) {
				o.port = (int)u;
			} else if (!strcmp(key, "--bind")) {
				o.bind = val;
			} else if (!strcmp(key, "--disk")) {
				o.disk = val;
				o.disk_is_file = 0;
			} else if (!strcmp(key, "--disk-file")) {
				o.disk = val;
				o.disk_is_file = 1;
			} else if (!strcmp(key, "--dirty")) {
				o.dirty = val;
			} else if (!strcmp(key, "--hb-ms") && !parse_uint(val, 3600000, &u) && u) {
				o.hb_ms = u;
			} else if (!strcmp(key, "--ack-ms") && !parse_uint(val, 3600000, &u)) {
				o.ack_ms = u;
			} else if (!strcmp(key, "--disk-pace-us") && !parse_uint(val, 10000000, &u)) {
				o.disk_pace_us = u;
			} else if (!strcmp(key, "--once-verify")) {
				o.once_verify = 1;
			} else if (!strcmp(key, "--guest")) {
				o.guest = 1;
			} else {
				if (strcmp(key, "--help"))
					warnx("probe: bad option %s\n", a);
				usage();
				return 2;
			}
			continue;
		}
		/* Split in place: role values (dirty=..., disk=...) point into argv. */
		for (char *save = NULL, *t = strtok_r(argv[i], ",", &save); t;
		     t = strtok_r(NULL, ",", &save)) {
			if (add_role(t, &o, roles, &nroles) < 0) {
				warnx("probe: unknown role '%s'\n", t);
				usage();
				return 2;
			}
		}
	}
	if (o.once_verify)
		return verify_only(&o);
	if (nroles == 0) {
		usage();
		return 2;
	}
	for (int i = 0; i < nroles; i++) {
		uint64_t sz, rate;
		int full;
		if (roles[i] == R_DIRTY && parse_dirty(o.dirty, &sz, &rate, &full) < 0) {
			warnx("probe: bad dirty spec '%s'\n", o.dirty);
			return 2;
		}
	}
	g_sh = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (g_sh == MAP_FAILED) {
		warnx("probe: mmap shared page: %s\n", strerror(errno));
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_stop;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	pid_t pids[MAX_ROLES];
	char list[256] = "";
	for (int i = 0; i < nroles; i++) {
		pids[i] = spawn((enum role)roles[i], &o);
		strncat(list, i ? "," : "", sizeof list - strlen(list) - 1);
		strncat(list, role_names[roles[i]], sizeof list - strlen(list) - 1);
	}
	emit("FERRY-PROBE-START pid=%d roles=%s\n", (int)getpid(), list);
	int rc = 0;
	while (!g_stop) {
		int st;
		pid_t pid = waitpid(-1, &st, 0);
		if (pid < 0) {
			if (errno == ECHILD)
				break;
			continue; /* EINTR: re-check g_stop */
		}
		int idx = -1;
		for (int i = 0; i < nroles; i++)
			if (pids[i] == pid)
				idx = i;
		if (idx < 0)
			continue;
		int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
		emit("FERRY-ROLE-EXIT role=%s status=%d\n", role_names[roles[idx]], code);
		pids[idx] = -1;
		if (code == EXIT_POWEROFF) {
			g_stop = 1;
			break;
		}
		if (code == 2) { /* usage/config error: restarting will not help */
			rc = 2;
			continue;
		}
		sleep_ns(1000000000ull);
		if (!g_stop)
			pids[idx] = spawn((enum role)roles[idx], &o);
	}
	for (int i = 0; i < nroles; i++)
		if (pids[i] > 0)
			kill(pids[i], SIGKILL);
	while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
		;
	return rc;
}
