/*
 * mpi_allreduce.c: the MPI baseline of `efa-bench allreduce`, with the same flags (a subset
 * of nccl-tests': -b -e -f -n -w -c -d float -o sum) and the same output columns
 * (nccl-tests' all_reduce_perf, out-of-place section).
 *
 * Per size: -w untimed MPI_Allreduce calls, a barrier, then -n timed calls (out of place,
 * MPI_FLOAT, MPI_SUM); the time reported is the max over ranks of the mean per-iteration
 * time, as efa-bench and nccl-tests report it. -c 1 checks the last result: rank r's input
 * at index i is 1 + (i + 3r) % 4, so every sum is exact.
 *
 *   mpicc.openmpi -O2 -o mpi_allreduce bench/mpi_allreduce.c
 *   mpirun.openmpi --allow-run-as-root -n 2 --mca btl self,vader ./mpi_allreduce -b 4k -e 64m -f 4
 */
#define PROG "mpi_allreduce"
#include "mpi_common.h"

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int nranks;


int main(int argc, char **argv) {
    size_t minb = 8, maxb = 64 << 20;
    long factor = 2, iters = 20, warmup = 5, check = 1;
    int opt;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    while ((opt = getopt(argc, argv, "b:e:f:n:w:c:d:o:")) != -1) {
        switch (opt) {
        case 'b': minb = parse_size(optarg, ""); break;
        case 'e': maxb = parse_size(optarg, ""); break;
        case 'f': factor = parse_int(optarg, 2, "-f must be an integer >= 2: "); break;
        case 'n': iters = parse_int(optarg, 1, "-n must be >= 1: "); break;
        case 'w': warmup = parse_int(optarg, 0, "-w must be >= 0: "); break;
        case 'c': check = parse_int(optarg, 0, "-c must be 0 or 1: "); break;
        case 'd': if (strcmp(optarg, "float")) die("only -d float is supported, not ", optarg); break;
        case 'o': if (strcmp(optarg, "sum")) die("only -o sum is supported, not ", optarg); break;
        default: die("usage: mpi_allreduce [-b min] [-e max] [-f factor] [-n iters] [-w warmup] [-c 0|1] [-d float] [-o sum]", NULL);
        }
    }
    if (minb > maxb) die("-b is larger than -e", NULL);

    size_t maxcount = maxb / sizeof(float);
    float *send = malloc((maxcount ? maxcount : 1) * sizeof(float));
    float *recv = malloc((maxcount ? maxcount : 1) * sizeof(float));
    double *samples = malloc(iters * sizeof(double));
    if (!send || !recv || !samples) die("out of memory", NULL);
    for (size_t i = 0; i < maxcount; i++) send[i] = (float)(1 + (i + 3 * (size_t)rank) % 4);

    if (rank == 0) {
        int len;
        char lib[MPI_MAX_LIBRARY_VERSION_STRING];
        MPI_Get_library_version(lib, &len);
        char *nl = strchr(lib, '\n');
        if (nl) *nl = 0;
        printf("# mpi_allreduce (all_reduce_perf format, out-of-place section)\n");
        printf("# nRanks %d minBytes %zu maxBytes %zu step: %ld(factor) warmup iters: %ld iters: %ld validation: %ld\n",
               nranks, minb, maxb, factor, warmup, iters, check);
        printf("# %s\n#\n", lib);
        printf("# %10s  %12s  %8s  %6s  %6s           out-of-place\n", "", "", "", "", "");
        printf("# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s %6s\n", "size", "count", "type", "redop",
               "root", "time", "algbw", "busbw", "#wrong");
        printf("# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s\n", "(B)", "(elements)", "", "", "",
               "(us)", "(GB/s)", "(GB/s)");
        fflush(stdout);
    }
    long long wrong_total = 0;
    double busbw_sum = 0;
    int rows = 0;
    for (size_t size = minb; size <= maxb; size = size ? size * factor : 1) {
        size_t count = size / sizeof(float);
        for (long i = 0; i < warmup; i++)
            MPI_Allreduce(send, recv, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (long i = 0; i < iters; i++) {
            double t = MPI_Wtime();
            MPI_Allreduce(send, recv, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
            samples[i] = MPI_Wtime() - t; /* same per-iteration clock reads as efa-bench */
        }
        double mean = (MPI_Wtime() - t0) / iters, tmax;
        MPI_Allreduce(&mean, &tmax, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        long long wrong = 0, wrong_all = 0;
        if (check) {
            for (size_t i = 0; i < count; i++) {
                float e = 0;
                for (int r = 0; r < nranks; r++) e += (float)(1 + (i + 3 * (size_t)r) % 4);
                wrong += recv[i] != e;
            }
            MPI_Allreduce(&wrong, &wrong_all, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
        }
        double algbw = (double)(count * sizeof(float)) / 1e9 / tmax;
        double busbw = algbw * 2.0 * (nranks - 1) / nranks;
        double us = tmax * 1e6;
        wrong_total += wrong_all;
        busbw_sum += busbw;
        rows++;
        if (rank == 0) {
            char t[32], w[32];
            snprintf(t, sizeof t, us >= 10000.0 ? "%7.0f" : us >= 100.0 ? "%7.1f" : "%7.2f", us);
            if (check) snprintf(w, sizeof w, "%lld", wrong_all);
            else snprintf(w, sizeof w, "N/A");
            printf("%12zu  %12zu  %8s  %6s  %6i  %7s  %6.2f  %6.2f  %5s\n", count * sizeof(float),
                   count, "float", "sum", -1, t, algbw, busbw, w);
            fflush(stdout);
        }
        if (size == 0 && maxb == 0) break;
    }
    if (rank == 0) {
        printf("# Out of bounds values : %lld %s\n", wrong_total, !check ? "N/A" : wrong_total ? "FAILED" : "OK");
        printf("# Avg bus bandwidth    : %f \n#\n", rows ? busbw_sum / rows : 0.0);
    }
    free(send);
    free(recv);
    free(samples);
    MPI_Finalize();
    return wrong_total ? 1 : 0;
}
