/*
 * mpi_osu.c: the MPI baseline of `efa-bench osu-latency`, `osu-bw` and `osu-bibw`: the OSU
 * micro-benchmarks' point-to-point method, iteration counts and output, with efa-bench's
 * flags, so that bench/compare.sh can run both the same way (OSU itself is not packaged in
 * Debian). The first argument picks the test:
 *
 *   mpi_osu latency|bw|bibw [-S SIZES] [-m [MIN:]MAX] [-I ITERS] [-w WARMUP] [-W WINDOW]
 *
 *   SIZES: a comma list (8,1k,4m); default OSU's sweep: 0 (latency) or 1, doubling to 4 MiB.
 *   ITERS/WARMUP: default OSU's: latency 10000/100 up to 8 KiB, 1000/10 above; bandwidth
 *   100/10 up to 8 KiB, 20/2 above (a bandwidth iteration is one window). WINDOW: 64.
 *
 * Method (OSU 5.x-7.x mpi/pt2pt), 2 ranks, MPI_Barrier before each size:
 *   latency: rank 0 MPI_Send then MPI_Recv, rank 1 the reverse (tag 1); elapsed / (2 iters).
 *   bw:      rank 0 W MPI_Isend (tag 100), MPI_Waitall, MPI_Recv of a 4-byte ack (tag 101);
 *            rank 1 W MPI_Irecv, MPI_Waitall, MPI_Send of the ack. size * iters * W / elapsed.
 *   bibw:    both W MPI_Irecv then W MPI_Isend, MPI_Waitall sends, MPI_Waitall receives;
 *            2 * size * iters * W / elapsed.
 * Bandwidth in MB/s (10^6 bytes), latency in us, rank 0's MPI_Wtime.
 *
 * As in efa-bench (and unlike OSU, which posts a window's receives into one buffer), each
 * receive of a window has its own slot of a W * size buffer; and the last message of each
 * size is checked against the sender's pattern (a mismatch exits with status 1).
 *
 *   mpicc.openmpi -O2 -o mpi_osu bench/mpi_osu.c
 *   mpirun.openmpi -n 2 --mca pml ob1 --mca btl self,vader ./mpi_osu latency -S 8,1k
 */
#define PROG "mpi_osu"
#include "mpi_common.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum test { LATENCY, BW, BIBW };

static unsigned char pattern(int r, size_t i) { return (unsigned char)(i * 7 + 1 + 64 * r); }

static void check(const unsigned char *got, size_t n, int peer, const char *what) {
    for (size_t i = 0; i < n; i++) {
        if (got[i] != pattern(peer, i)) {
            fprintf(stderr, "mpi_osu %s: byte %zu of %zu from rank %d is 0x%02x, expected 0x%02x\n",
                    what, i, n, peer, got[i], pattern(peer, i));
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
    }
}

#define MAX_SIZES 64

int main(int argc, char **argv) {
    size_t sizes[MAX_SIZES];
    int nsizes = 0, opt, nranks;
    long iters = -1, warmup = -1, window = 64;
    enum test t;
    const char *name;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (argc < 2) die("usage: mpi_osu latency|bw|bibw [-S sizes] [-m [min:]max] [-I n] [-w n] [-W n]", NULL);
    if (!strcmp(argv[1], "latency")) { t = LATENCY; name = "Latency Test"; }
    else if (!strcmp(argv[1], "bw")) { t = BW; name = "Bandwidth Test"; }
    else if (!strcmp(argv[1], "bibw")) { t = BIBW; name = "Bi-Directional Bandwidth Test"; }
    else die("the test is latency, bw or bibw, not ", argv[1]);
    if (nranks != 2) die("this test requires exactly two processes", NULL);
    optind = 2;
    while ((opt = getopt(argc, argv, "S:m:I:w:W:")) != -1) {
        switch (opt) {
        case 'S':
            for (char *p = optarg; *p;) {
                if (nsizes == MAX_SIZES) die("too many sizes: ", optarg);
                sizes[nsizes++] = parse_size(p, ",:");
                p = strchr(p, ',');
                if (!p) break;
                p++;
            }
            break;
        case 'm': {
            char *colon = strchr(optarg, ':');
            size_t lo = colon ? parse_size(optarg, ",:") : 0, hi = parse_size(colon ? colon + 1 : optarg, ",:");
            if (lo > hi) die("-m: MIN is larger than MAX: ", optarg);
            for (size_t s = lo; s <= hi && nsizes < MAX_SIZES; s = s ? 2 * s : 1) sizes[nsizes++] = s;
            break;
        }
        case 'I': iters = parse_int(optarg, 1, "-I: not a positive integer: "); break;
        case 'w': warmup = parse_int(optarg, 0, "-w: not a non-negative integer: "); break;
        case 'W': window = parse_int(optarg, 1, "-W: not a positive integer: "); break;
        default: die("unknown flag", NULL);
        }
    }
    if (t == LATENCY) window = 1;
    if (!nsizes)
        for (size_t s = t == LATENCY ? 0 : 1; s <= (4 << 20); s = s ? 2 * s : 1) sizes[nsizes++] = s;
    size_t max = 0;
    for (int i = 0; i < nsizes; i++) max = sizes[i] > max ? sizes[i] : max;
    size_t stride = max ? max : 1;
    unsigned char *sbuf = malloc(max ? max : 1), *rbuf = malloc(window * stride);
    MPI_Request *sreq = malloc(window * sizeof *sreq), *rreq = malloc(window * sizeof *rreq);
    if (!sbuf || !rbuf || !sreq || !rreq) die("out of memory", NULL);
    for (size_t i = 0; i < max; i++) sbuf[i] = pattern(rank, i);
    memset(rbuf, 0, window * stride);
    int peer = 1 - rank;
    if (rank == 0) {
        char version[MPI_MAX_LIBRARY_VERSION_STRING];
        int len;
        MPI_Get_library_version(version, &len);
        char *nl = strchr(version, '\n');
        if (nl) *nl = 0;
        printf("# mpi_osu %s %s (%s)\n", argv[1], name, version);
        printf("%-10s%20s\n", "# Size", t == LATENCY ? "Latency (us)" : "Bandwidth (MB/s)");
        fflush(stdout);
    }
    char ack[4] = {0};
    for (int k = 0; k < nsizes; k++) {
        size_t size = sizes[k];
        int large = size > 8192;
        long n = iters > 0 ? iters : t == LATENCY ? (large ? 1000 : 10000) : (large ? 20 : 100);
        long skip = warmup >= 0 ? warmup : t == LATENCY ? (large ? 10 : 100) : (large ? 2 : 10);
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (long i = 0; i < n + skip; i++) {
            if (i == skip) t0 = MPI_Wtime();
            if (t == LATENCY) {
                if (rank == 0) {
                    MPI_Send(sbuf, (int)size, MPI_CHAR, peer, 1, MPI_COMM_WORLD);
                    MPI_Recv(rbuf, (int)size, MPI_CHAR, peer, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                } else {
                    MPI_Recv(rbuf, (int)size, MPI_CHAR, peer, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                    MPI_Send(sbuf, (int)size, MPI_CHAR, peer, 1, MPI_COMM_WORLD);
                }
            } else if (t == BW) {
                if (rank == 0) {
                    for (long j = 0; j < window; j++)
                        MPI_Isend(sbuf, (int)size, MPI_CHAR, peer, 100, MPI_COMM_WORLD, &sreq[j]);
                    MPI_Waitall((int)window, sreq, MPI_STATUSES_IGNORE);
                    MPI_Recv(ack, 4, MPI_CHAR, peer, 101, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                } else {
                    for (long j = 0; j < window; j++)
                        MPI_Irecv(rbuf + j * stride, (int)size, MPI_CHAR, peer, 100, MPI_COMM_WORLD, &rreq[j]);
                    MPI_Waitall((int)window, rreq, MPI_STATUSES_IGNORE);
                    MPI_Send(ack, 4, MPI_CHAR, peer, 101, MPI_COMM_WORLD);
                }
            } else {
                int rtag = rank == 0 ? 10 : 100, stag = rank == 0 ? 100 : 10;
                for (long j = 0; j < window; j++)
                    MPI_Irecv(rbuf + j * stride, (int)size, MPI_CHAR, peer, rtag, MPI_COMM_WORLD, &rreq[j]);
                for (long j = 0; j < window; j++)
                    MPI_Isend(sbuf, (int)size, MPI_CHAR, peer, stag, MPI_COMM_WORLD, &sreq[j]);
                MPI_Waitall((int)window, sreq, MPI_STATUSES_IGNORE);
                MPI_Waitall((int)window, rreq, MPI_STATUSES_IGNORE);
            }
        }
        double elapsed = MPI_Wtime() - t0;
        if (t == LATENCY || t == BIBW || rank == 1)
            for (long j = 0; j < window; j++) check(rbuf + j * stride, size, peer, argv[1]);
        if (rank == 0) {
            double v = t == LATENCY ? elapsed * 1e6 / (2.0 * n)
                                    : (double)size / 1e6 * n * window * (t == BIBW ? 2 : 1) / elapsed;
            printf("%-10zu%20.2f\n", size, v);
            fflush(stdout);
        }
    }
    MPI_Barrier(MPI_COMM_WORLD);
    free(sbuf);
    free(rbuf);
    free(sreq);
    free(rreq);
    MPI_Finalize();
    return 0;
}
