// SPDX-License-Identifier: GPL-2.0
/*
 * resident_host: the host thread of the GPU-resident XTS service
 * (helper/serve/resident/host.py, helper/cuda/resident.cu). A shared library,
 * loaded with ctypes; the thread runs without the GIL.
 *
 * The persistent kernel takes requests from the SQ and publishes CQEs and
 * cq_tail itself. What the GPU cannot do is wake a sleeping CPU, so this
 * thread notices two counters the GPU writes in host memory and turns
 * them into wake-ups:
 *  - cq_tail moved: ring the completion doorbell, once for everything
 *    that completed since the last look;
 *  - the spill SQ's tail moved: signal an eventfd that the helper's
 *    Python loop sleeps on (requests the GPU leaves to it).
 *
 * Two rings, two kinds of doorbell (cfg.mode):
 *  - RH_SOCKET, the shm ring of kgpu_helper.ringdriver: the doorbell is
 *    the driver's socket, one byte each way. The GPU stores sq_head as it
 *    takes requests (informative: the driver does not wait on it).
 *  - RH_KGPU, kgpu.ko's /dev/kgpu: the completion doorbell is
 *    ioctl(KGPU_IOC_COMPLETE) (cfg.bell_ioctl), which reaps the CQ up to
 *    cq_tail. poll() on the file reports POLLIN while the region's sq_head
 *    differs from the module's sq_tail (nothing else in the module reads
 *    sq_head), and POLLERR | POLLHUP once the file is no longer the
 *    attached helper's. Here the GPU does not write sq_head (resident.cu's
 *    write_sq_head is 0): this thread does, with the cq_tail it last saw
 *    (every request answered was taken), at each look that finds cq_tail
 *    moved and before each sleep in poll(). Since at most ring_entries
 *    requests are in flight, sq_tail - ring_entries <= sq_head <= sq_tail
 *    always. Before a sleep nothing is outstanding (sq_tail == cq_tail),
 *    so the store makes sq_head equal to the sq_tail just read: a
 *    submission after it makes the module's poll() readable (poll() is
 *    entered after the store, and the module checks the condition after
 *    queueing the waiter), so no wake-up is lost.
 *
 * How it waits, so that it costs little CPU:
 *  - nothing outstanding (sq_tail == cq_tail): it drains the submitters'
 *    doorbell bytes (RH_SOCKET) or stores sq_head (RH_KGPU), looks once
 *    more, then sleeps in poll() on the doorbell fd (a new submission
 *    wakes it, as it would wake the helper);
 *  - at most spin_below requests outstanding (spin_below > 0: none
 *    outstanding too): it spins (pause) for up to spin_us after the last
 *    progress, for latency at low depth;
 *  - otherwise it sleeps sleep_us between looks (nanosleep, timer slack
 *    set to 1 us), so one doorbell covers every completion of that window.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { RH_SOCKET, RH_KGPU };

struct rh_cfg {
	volatile uint32_t *sq_tail;	/* region: written by the submitter */
	volatile uint32_t *cq_tail;	/* region: written by the GPU */
	volatile uint32_t *spill_tail;	/* ctl: written by the GPU */
	volatile uint64_t *stats;	/* RH_STAT_* words, read by Python */
	int32_t bell_fd;		/* the shm ring's socket, or /dev/kgpu */
	int32_t spill_fd;		/* eventfd of the Python loop */
	int32_t wake_fd;		/* eventfd: rh_stop() */
	uint32_t spin_below;
	uint32_t spin_us;
	uint32_t sleep_us;
	uint32_t mode;			/* RH_SOCKET or RH_KGPU */
	uint32_t bell_ioctl;		/* RH_KGPU: KGPU_IOC_COMPLETE */
	volatile uint32_t *sq_head;	/* RH_KGPU: region, written here */
};

enum {
	RH_STAT_LOOPS,		/* looks at the counters */
	RH_STAT_BELLS,		/* completion doorbells rung */
	RH_STAT_SPILLS,		/* spill signals */
	RH_STAT_POLLS,		/* sleeps in poll() (idle) */
	RH_STAT_SLEEPS,		/* short sleeps (busy) */
	RH_STAT_HANGUP,		/* 1: the ring's other side went away */
	RH_STAT_SPIN_NS,	/* time spent spinning */
	RH_STAT_COUNT
};

struct rh {
	struct rh_cfg c;
	pthread_t th;
	volatile int stop;
	uint32_t seen_cq, seen_sp;	/* as rh_start() found them */
};

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint32_t load(volatile uint32_t *p)
{
	return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static void stat_add(struct rh *h, int i, uint64_t v)
{
	__atomic_add_fetch(&h->c.stats[i], v, __ATOMIC_RELAXED);
}

/* the submitters' doorbell bytes; 0 on hang-up */
static int drain_bells(struct rh *h)
{
	char buf[4096];

	for (;;) {
		ssize_t n = recv(h->c.bell_fd, buf, sizeof(buf), MSG_DONTWAIT);

		if (n == 0)
			return 0;
		if (n < 0)
			return errno == EAGAIN || errno == EWOULDBLOCK ||
			       errno == EINTR;
		if (n < (ssize_t)sizeof(buf))
			return 1;
	}
}

/*
 * The completion doorbell; 0 when the ring's other side is gone (the
 * module answers ENODEV once the file is no longer the helper's).
 */
static int ring_bell(struct rh *h)
{
	if (h->c.mode == RH_KGPU)
		return ioctl(h->c.bell_fd, h->c.bell_ioctl, 0) >= 0;
	/* a full socket: the submitter has bells to read */
	send(h->c.bell_fd, "d", 1, MSG_DONTWAIT | MSG_NOSIGNAL);
	return 1;
}

/*
 * Nothing outstanding, up to sq_tail @tail: get ready to sleep in poll().
 * 0 on hang-up.
 */
static int settle(struct rh *h, uint32_t tail)
{
	if (h->c.mode == RH_KGPU) {
		/* all taken: poll() is readable from the next submission on */
		__atomic_store_n(h->c.sq_head, tail, __ATOMIC_RELEASE);
		return 1;
	}
	return drain_bells(h);
}

/* RH_KGPU: requests up to cq_tail @cq were taken (see above). */
static void taken(struct rh *h, uint32_t cq)
{
	if (h->c.mode == RH_KGPU)
		__atomic_store_n(h->c.sq_head, cq, __ATOMIC_RELEASE);
}

static void hangup(struct rh *h)
{
	__atomic_store_n(&h->c.stats[RH_STAT_HANGUP], 1, __ATOMIC_RELEASE);
	eventfd_write(h->c.spill_fd, 1);
}

static void *rh_main(void *arg)
{
	struct rh *h = arg;
	struct rh_cfg *c = &h->c;
	uint32_t seen_cq = h->seen_cq, seen_sp = h->seen_sp;
	int64_t last = now_ns(), spin_ns = (int64_t)c->spin_us * 1000;
	struct timespec nap = { 0, (long)c->sleep_us * 1000 };

	prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
	prctl(PR_SET_NAME, "kgpu-rhost", 0, 0, 0);	/* for per-thread CPU */
	while (!h->stop) {
		uint32_t cq = load(c->cq_tail), sp = load(c->spill_tail);
		uint32_t tail, out;

		stat_add(h, RH_STAT_LOOPS, 1);
		if (cq != seen_cq) {
			seen_cq = cq;
			last = now_ns();
			taken(h, cq);
			if (!ring_bell(h)) {
				hangup(h);
				break;
			}
			stat_add(h, RH_STAT_BELLS, 1);
		}
		if (sp != seen_sp) {
			seen_sp = sp;
			last = now_ns();
			eventfd_write(c->spill_fd, 1);
			stat_add(h, RH_STAT_SPILLS, 1);
		}
		tail = load(c->sq_tail);
		out = tail - cq;
		if (c->spin_below && out <= c->spin_below &&
		    now_ns() - last < spin_ns) {
			/*
			 * low depth (none or at most spin_below outstanding,
			 * shortly after progress): the next request or
			 * completion usually follows at once
			 */
			int64_t t = now_ns();
			int k;

			for (k = 0; k < 64; k++)
				__builtin_ia32_pause();
			stat_add(h, RH_STAT_SPIN_NS, now_ns() - t);
			continue;
		}
		if (out == 0) {
			struct pollfd p[2] = {
				{ .fd = c->bell_fd, .events = POLLIN },
				{ .fd = c->wake_fd, .events = POLLIN },
			};
			int n;

			if (!settle(h, tail)) {
				hangup(h);
				break;
			}
			/*
			 * A submission after the drain rings again (on kgpu.ko's
			 * ring: one after the store of sq_head makes the file
			 * readable). One that came after the look above and is
			 * already complete rings nothing: its completion must
			 * be rung first (a sleep here cost 100 ms, the poll()
			 * timeout, in about 1 % of depth-1 requests, H200).
			 */
			cq = load(c->cq_tail);
			if (load(c->sq_tail) != cq || cq != seen_cq ||
			    load(c->spill_tail) != seen_sp)
				continue;
			stat_add(h, RH_STAT_POLLS, 1);
			n = poll(p, 2, 100);
			if (n > 0 &&
			    (p[0].revents & (POLLHUP | POLLERR | POLLNVAL))) {
				hangup(h);
				break;
			}
			if (n > 0)	/* woken: spin for what follows */
				last = now_ns();
			continue;
		}
		stat_add(h, RH_STAT_SLEEPS, 1);
		nanosleep(&nap, NULL);
	}
	return NULL;
}

void *rh_start(const struct rh_cfg *cfg)
{
	struct rh *h;

	if (cfg->mode > RH_KGPU || (cfg->mode == RH_KGPU && !cfg->sq_head))
		return NULL;
	h = calloc(1, sizeof(*h));
	if (!h)
		return NULL;
	h->c = *cfg;
	h->seen_cq = load(cfg->cq_tail);
	h->seen_sp = load(cfg->spill_tail);
	if (pthread_create(&h->th, NULL, rh_main, h)) {
		free(h);
		return NULL;
	}
	return h;
}

int rh_stop(void *handle)
{
	struct rh *h = handle;

	if (!h)
		return -1;
	h->stop = 1;
	eventfd_write(h->c.wake_fd, 1);
	pthread_join(h->th, NULL);
	free(h);
	return 0;
}

/* CPU time of the thread so far, in ns; -1 if unknown. */
int64_t rh_cpu_ns(void *handle)
{
	struct rh *h = handle;
	struct timespec ts;
	clockid_t cid;

	if (!h || pthread_getcpuclockid(h->th, &cid) ||
	    clock_gettime(cid, &ts))
		return -1;
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int rh_stat_count(void)
{
	return RH_STAT_COUNT;
}
