// SPDX-License-Identifier: GPL-2.0
/*
 * ringsub: the kernel's side of the kgpu ring in the hot loop of
 * `kgpu bench ring`, in C, submitting and completing the way kgpu.ko does.
 *
 * The Python ring driver (helper/rings/ringdriver.py) creates the region,
 * loads the keys, fills the buffers and accepts the helper; it then runs
 * this program with the region's memfd and the helper's doorbell socket
 * inherited, and a file of request templates (struct kgpu_sqe, one per
 * buffer: depth of them).
 *
 * - Submitters: --threads threads; thread t owns templates t, t + T, ...
 *   Each request is published on its own, as kgpu_submit() does: under
 *   one lock, write the SQE at sq_tail, store-release sq_tail + 1, then
 *   ring the helper's doorbell (one byte on the socket: the module's
 *   wake_up_interruptible on its poll queue). A submitter then sleeps on
 *   a condition variable until one of its requests completes.
 * - Completer: one thread sleeps in poll() on the socket (the helper's
 *   KGPU_IOC_COMPLETE doorbell), reaps [cq_head, cq_tail), checks tag and
 *   seq as the module does, records the latency, and wakes each submitter
 *   that got a completion (the module's done() callbacks).
 *
 * Nothing spins. Output: one JSON object on stdout.
 *
 * usage: ringsub MEMFD SOCKFD TEMPLATES SECONDS WARMUP THREADS SEQ0
 *                HELPER_PID COUNTERS_FILE|-
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* the layout of kmod/uapi/kgpu.h, without including kernel headers */
struct hdr {
	uint32_t magic, abi_version;
	uint64_t region_size;
	uint32_t ring_entries, sqe_size, cqe_size, key_slots, key_slot_size,
		 data_align;
	uint64_t sq_off, cq_off, keys_off, data_off, data_size, rw_off,
		 idx_off, reserved[4];
};
struct sqe {
	uint64_t seq;
	uint32_t tag;
	uint16_t service, flags;
	uint8_t rest[48];
};
struct cqe {
	uint64_t seq;
	uint32_t tag;
	int16_t status;
	uint16_t flags;
};
_Static_assert(sizeof(struct sqe) == 64, "sqe");
_Static_assert(sizeof(struct cqe) == 16, "cqe");
#define SQ_TAIL 0
#define SQ_HEAD 16
#define CQ_TAIL 32
#define CQ_HEAD 48
#define CQE_CPU 1		/* KGPU_CQE_CPU */
#define CQE_RESIDENT 2		/* KGPU_CQE_RESIDENT */

struct slot {
	struct sqe tmpl;
	uint64_t seq;
	int64_t t_submit;
	int done;		/* under its owner's lock */
};

struct owner {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int ndone;
	pthread_t th;
	int id;
};

static uint8_t *region;
static volatile uint32_t *idx;
static struct sqe *sq;
static struct cqe *cq;
static uint32_t mask;
static struct slot *slots;
static int nslots, nthreads, sockfd;
static struct owner *owners;
static pthread_mutex_t sq_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t next_seq;
static volatile int stopping;	/* no more submissions */
static volatile int measuring;
static int64_t *lat;
static size_t nlat, cap_lat;
static uint64_t done_total, errors, cpu_flagged, resident_flagged, bad,
	bells_lost;
static uint64_t measured;
static int inflight;

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double cpu_self(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
	       ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static double cpu_of(int pid)
{
	char path[96];
	DIR *d;
	struct dirent *e;
	double total = 0;

	if (pid <= 0)
		return -1;
	snprintf(path, sizeof(path), "/proc/%d/task", pid);
	d = opendir(path);
	if (!d)
		return -1;
	while ((e = readdir(d))) {
		char p2[320];
		unsigned long long ns;
		FILE *f;

		if (e->d_name[0] == '.')
			continue;
		snprintf(p2, sizeof(p2), "/proc/%d/task/%s/schedstat", pid,
			 e->d_name);
		f = fopen(p2, "r");
		if (!f)
			continue;
		if (fscanf(f, "%llu", &ns) == 1)
			total += ns / 1e9;
		fclose(f);
	}
	closedir(d);
	return total;
}

static volatile uint64_t *counters;	/* the helper's: [0] spin ns, [1] sync ns */

static double helper_counter(int i)
{
	return counters ? counters[i] / 1e9 : -1;
}

static void submit(int i)
{
	struct slot *s = &slots[i];
	uint32_t tail;

	pthread_mutex_lock(&sq_lock);
	s->seq = next_seq++;
	s->t_submit = now_ns();
	tail = idx[SQ_TAIL];
	sq[tail & mask] = s->tmpl;
	sq[tail & mask].seq = s->seq;
	sq[tail & mask].tag = i;
	__atomic_store_n(&idx[SQ_TAIL], tail + 1, __ATOMIC_RELEASE);
	__atomic_add_fetch(&inflight, 1, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&sq_lock);
	/* wake_up_interruptible(&poll_wq): one doorbell byte per request */
	if (send(sockfd, "d", 1, MSG_DONTWAIT) != 1)
		__atomic_add_fetch(&bells_lost, 1, __ATOMIC_RELAXED);
}

static void *submitter(void *arg)
{
	struct owner *o = arg;
	int i;

	for (i = o->id; i < nslots; i += nthreads)
		submit(i);
	for (;;) {
		pthread_mutex_lock(&o->lock);
		while (!o->ndone && !stopping)
			pthread_cond_wait(&o->cond, &o->lock);
		if (stopping) {
			pthread_mutex_unlock(&o->lock);
			return NULL;
		}
		o->ndone = 0;
		pthread_mutex_unlock(&o->lock);
		for (i = o->id; i < nslots; i += nthreads) {
			int d;

			pthread_mutex_lock(&o->lock);
			d = slots[i].done;
			slots[i].done = 0;
			pthread_mutex_unlock(&o->lock);
			if (d && !stopping)
				submit(i);
		}
	}
}

/*
 * reap [cq_head, cq_tail) as the module's KGPU_IOC_COMPLETE does: take
 * the CQEs, give their CQ entries back (cq_head), and only then complete
 * the requests, whose submitters may submit again at once: a request
 * counts as in flight until its CQE is consumed, so that neither ring
 * can overflow.
 */
static int reap(void)
{
	static struct cqe got[65536];
	uint32_t head = idx[CQ_HEAD];
	uint32_t tail = __atomic_load_n(&idx[CQ_TAIL], __ATOMIC_ACQUIRE);
	uint32_t m = tail - head, j;
	int64_t t = now_ns();
	int n = 0;
	char woke[1024] = {0};
	int k;

	if (m > mask + 1) {	/* the helper published nonsense */
		bad += m;
		__atomic_store_n(&idx[CQ_HEAD], tail, __ATOMIC_RELEASE);
		return 0;
	}
	for (j = 0; j < m; j++)
		got[j] = cq[(head + j) & mask];
	__atomic_store_n(&idx[CQ_HEAD], tail, __ATOMIC_RELEASE);
	for (j = 0; j < m; j++) {
		struct cqe c = got[j];
		struct slot *s;
		struct owner *o;

		if (c.tag >= (uint32_t)nslots || slots[c.tag].seq != c.seq ||
		    !slots[c.tag].t_submit) {
			bad++;
			continue;
		}
		s = &slots[c.tag];
		if (measuring) {
			if (nlat < cap_lat)
				lat[nlat++] = t - s->t_submit;
			measured++;
			if (c.status)
				errors++;
			if (c.flags & CQE_CPU)
				cpu_flagged++;
			if (c.flags & CQE_RESIDENT)
				resident_flagged++;
		}
		s->t_submit = 0;
		done_total++;
		n++;
		__atomic_sub_fetch(&inflight, 1, __ATOMIC_RELAXED);
		o = &owners[c.tag % nthreads];
		pthread_mutex_lock(&o->lock);
		s->done = 1;
		o->ndone++;
		pthread_mutex_unlock(&o->lock);
		woke[c.tag % nthreads] = 1;
	}
	for (k = 0; k < nthreads; k++)
		if (woke[k])
			pthread_cond_signal(&owners[k].cond);
	return n;
}

/* sleep until the helper's doorbell, then reap; -1 on hang-up/timeout */
static int wait_and_reap(int timeout_ms)
{
	struct pollfd p = { .fd = sockfd, .events = POLLIN };
	char buf[4096];
	int r;

	r = poll(&p, 1, timeout_ms);
	if (r < 0 && errno != EINTR)
		return -1;
	if (r == 0)
		return reap() ? 0 : -1;
	if (p.revents & (POLLHUP | POLLERR))
		return -1;
	for (;;) {
		ssize_t m = recv(sockfd, buf, sizeof(buf), MSG_DONTWAIT);

		if (m == 0)
			return -1;
		if (m < (ssize_t)sizeof(buf))
			break;
	}
	reap();
	return 0;
}

static int cmp64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

	return x < y ? -1 : x > y;
}

static double pct(double q)
{
	size_t i;

	if (!nlat)
		return -1;
	i = (size_t)(q / 100.0 * (nlat - 1) + 0.5);
	return lat[i] / 1e3;
}

int main(int argc, char **argv)
{
	int memfd, i, hpid;
	struct stat st;
	struct hdr *h;
	double secs, warm, c0, c1, h0, h1, s0, s1, y0, y1;
	int64_t t0, t1, tw;
	FILE *f;
	long sz;

	if (argc != 10) {
		fprintf(stderr, "usage: ringsub MEMFD SOCKFD TEMPLATES SECONDS "
			"WARMUP THREADS SEQ0 HELPER_PID COUNTERS|-\n");
		return 2;
	}
	memfd = atoi(argv[1]);
	sockfd = atoi(argv[2]);
	secs = atof(argv[4]);
	warm = atof(argv[5]);
	nthreads = atoi(argv[6]);
	next_seq = strtoull(argv[7], NULL, 0);
	hpid = atoi(argv[8]);
	if (fstat(memfd, &st) < 0) {
		perror("ringsub: fstat region");
		return 1;
	}
	region = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED,
		      memfd, 0);
	if (region == MAP_FAILED) {
		perror("ringsub: mmap region");
		return 1;
	}
	h = (struct hdr *)region;
	idx = (volatile uint32_t *)(region + h->idx_off);
	sq = (struct sqe *)(region + h->sq_off);
	cq = (struct cqe *)(region + h->cq_off);
	mask = h->ring_entries - 1;
	if (strcmp(argv[9], "-")) {
		int cfd = open(argv[9], O_RDONLY);

		if (cfd >= 0) {
			void *m = mmap(NULL, 4096, PROT_READ, MAP_SHARED, cfd, 0);

			if (m != MAP_FAILED)
				counters = m;
			close(cfd);
		}
	}
	f = fopen(argv[3], "rb");
	if (!f) {
		perror("ringsub: templates");
		return 1;
	}
	fseek(f, 0, SEEK_END);
	sz = ftell(f);
	fseek(f, 0, SEEK_SET);
	nslots = sz / sizeof(struct sqe);
	if (h->ring_entries > 65536) {
		fprintf(stderr, "ringsub: rings of up to 65536 entries\n");
		return 1;
	}
	if (nslots < 1 || nslots > (int)h->ring_entries) {
		fprintf(stderr, "ringsub: %d templates for a ring of %u\n",
			nslots, h->ring_entries);
		return 1;
	}
	slots = calloc(nslots, sizeof(*slots));
	for (i = 0; i < nslots; i++)
		if (fread(&slots[i].tmpl, sizeof(struct sqe), 1, f) != 1)
			return 1;
	fclose(f);
	if (nthreads < 1)
		nthreads = 1;
	if (nthreads > nslots)
		nthreads = nslots;
	if (nthreads > 1024)
		nthreads = 1024;
	cap_lat = 16u << 20;
	lat = malloc(cap_lat * sizeof(*lat));
	owners = calloc(nthreads, sizeof(*owners));
	for (i = 0; i < nthreads; i++) {
		owners[i].id = i;
		pthread_mutex_init(&owners[i].lock, NULL);
		pthread_cond_init(&owners[i].cond, NULL);
	}
	for (i = 0; i < nthreads; i++)
		pthread_create(&owners[i].th, NULL, submitter, &owners[i]);

	tw = now_ns() + (int64_t)(warm * 1e9);
	while (now_ns() < tw)
		if (wait_and_reap(30000) < 0)
			goto gone;
	c0 = cpu_self();
	h0 = cpu_of(hpid);
	s0 = helper_counter(0);
	y0 = helper_counter(1);
	t0 = now_ns();
	measuring = 1;
	while (now_ns() - t0 < (int64_t)(secs * 1e9) || measured < 3u * nslots)
		if (wait_and_reap(30000) < 0)
			goto gone;
	measuring = 0;
	t1 = now_ns();
	c1 = cpu_self();
	h1 = cpu_of(hpid);
	s1 = helper_counter(0);
	y1 = helper_counter(1);
	stopping = 1;
	for (i = 0; i < nthreads; i++) {
		pthread_mutex_lock(&owners[i].lock);
		pthread_cond_signal(&owners[i].cond);
		pthread_mutex_unlock(&owners[i].lock);
		pthread_join(owners[i].th, NULL);
	}
	while (__atomic_load_n(&inflight, __ATOMIC_RELAXED) > 0)
		if (wait_and_reap(30000) < 0)
			goto gone;
	qsort(lat, nlat, sizeof(*lat), cmp64);
	printf("{\"requests\": %llu, \"seconds\": %.6f, \"p50_us\": %.2f, "
	       "\"p99_us\": %.2f, \"submitter_cpu_s\": %.6f, "
	       "\"helper_cpu_s\": %.6f, \"helper_spin_s\": %.6f, "
	       "\"helper_sync_s\": %.6f, "
	       "\"errors\": %llu, \"cpu_flagged\": %llu, "
	       "\"resident_flagged\": %llu, \"bad\": %llu, "
	       "\"next_seq\": %llu, \"threads\": %d, \"bells_lost\": %llu}\n",
	       (unsigned long long)measured, (t1 - t0) / 1e9, pct(50), pct(99),
	       c1 - c0, (h0 >= 0 && h1 >= 0) ? h1 - h0 : -1,
	       (s0 >= 0 && s1 >= 0) ? s1 - s0 : -1,
	       (y0 >= 0 && y1 >= 0) ? y1 - y0 : -1,
	       (unsigned long long)errors, (unsigned long long)cpu_flagged,
	       (unsigned long long)resident_flagged, (unsigned long long)bad,
	       (unsigned long long)next_seq, nthreads,
	       (unsigned long long)bells_lost);
	return 0;
gone:
	fprintf(stderr, "ringsub: the helper hung up or answered nothing for "
		"30 s (%d in flight)\n", inflight);
	return 3;
}
