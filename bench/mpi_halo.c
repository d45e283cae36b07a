/*
 * mpi_halo.c: the MPI counterpart of examples/halo.rs (same ring, sizes, stencil and
 * output), for side-by-side runs under the same oversubscription (bench/oversubscribed.sh).
 *
 * Each rank owns CELLS doubles of a ring; every iteration exchanges HALO cells with both
 * neighbours (MPI_Irecv/MPI_Isend, MPI_Waitall) and applies a 3-point average. Prints the
 * slowest rank's time per iteration. Settings from the environment: ITERS (1000), CELLS
 * (4096), HALO (128).
 *
 *   mpicc.openmpi -O2 -o mpi_halo bench/mpi_halo.c
 *   mpirun.openmpi --allow-run-as-root --oversubscribe -n 4 ./mpi_halo
 */
#include <mpi.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long env(const char *name, long dflt) {
    const char *v = getenv(name);
    if (!v || !*v) return dflt;
    long x = strtol(v, NULL, 10);
    return x > 0 ? x : dflt;
}

static double init(long g) { return (double)(g % 17); }

static void run(long iters, double *cur, double *next, long cells, long halo, int left,
                int right) {
    for (long it = 0; it < iters; it++) {
        MPI_Request reqs[4];
        /* The edges are sent from where they are, as examples/halo.rs does. */
        MPI_Irecv(cur, halo, MPI_DOUBLE, left, 1, MPI_COMM_WORLD, &reqs[0]);
        MPI_Irecv(cur + halo + cells, halo, MPI_DOUBLE, right, 0, MPI_COMM_WORLD, &reqs[1]);
        MPI_Isend(cur + halo, halo, MPI_DOUBLE, left, 0, MPI_COMM_WORLD, &reqs[2]);
        MPI_Isend(cur + cells, halo, MPI_DOUBLE, right, 1, MPI_COMM_WORLD, &reqs[3]);
        MPI_Waitall(4, reqs, MPI_STATUSES_IGNORE);
        for (long i = 0; i < cells; i++) {
            long c = i + halo;
            next[i] = (cur[c - 1] + cur[c] + cur[c + 1]) / 3.0;
        }
        memcpy(cur + halo, next, cells * sizeof(double));
    }
}

int main(int argc, char **argv) {
    int me, n;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    long iters = env("ITERS", 1000), cells = env("CELLS", 4096), halo = env("HALO", 128);
    if (halo > cells) halo = cells;
    long check_iters = 20;
    int left = (me + n - 1) % n, right = (me + 1) % n;
    double *cur = calloc(cells + 2 * halo, sizeof(double)), *next = calloc(cells, sizeof(double));
    for (long i = 0; i < cells; i++) cur[halo + i] = init((long)me * cells + i);
    run(check_iters, cur, next, cells, halo, left, right);
    long total = cells * n;
    double *ring = malloc(total * sizeof(double)), *prev = malloc(total * sizeof(double));
    for (long g = 0; g < total; g++) ring[g] = init(g);
    for (long it = 0; it < check_iters; it++) {
        memcpy(prev, ring, total * sizeof(double));
        for (long g = 0; g < total; g++)
            ring[g] = (prev[(g + total - 1) % total] + prev[g] + prev[(g + 1) % total]) / 3.0;
    }
    for (long i = 0; i < cells; i++) {
        double want = ring[(long)me * cells + i], got = cur[halo + i];
        if (fabs(got - want) > 1e-9 * fmax(fabs(want), 1.0)) {
            fprintf(stderr, "rank %d: cell %ld is %g, expected %g\n", me, i, got, want);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
    }
    for (long i = 0; i < cells; i++) cur[halo + i] = init((long)me * cells + i);
    MPI_Barrier(MPI_COMM_WORLD);
    double t = MPI_Wtime();
    run(iters, cur, next, cells, halo, left, right);
    double us = (MPI_Wtime() - t) * 1e6 / iters, worst;
    MPI_Allreduce(&us, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (me == 0)
        printf("halo ranks %d cells %ld halo_bytes %ld iters %ld usec_per_iter %.2f\n", n, cells,
               halo * 8, iters, worst);
    free(cur); free(next); free(ring); free(prev);
    MPI_Finalize();
    return 0;
}
