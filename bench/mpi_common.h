/*
 * mpi_common.h: what the MPI baselines (mpi_osu.c, mpi_allreduce.c) share: this rank, dying
 * with a message, and efa-bench's size and integer flags. Define PROG (the program's name
 * for messages) before including it. Header-only (static functions), so each baseline still
 * builds with one command: mpicc.openmpi -O2 -o mpi_osu bench/mpi_osu.c
 */
#ifndef MPI_COMMON_H
#define MPI_COMMON_H

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int rank;

/* Rank 0 prints "PROG: msg arg"; every rank aborts the job. */
static void die(const char *msg, const char *arg) {
    if (rank == 0) fprintf(stderr, PROG ": %s%s\n", msg, arg ? arg : "");
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

/* "64", "4k", "1m", "1g", followed by the end of the string or one of `stops` (a list
 * separator that the caller handles). */
static size_t parse_size(const char *s, const char *stops) {
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s) die("not a size: ", s);
    switch (*end) {
    case 'k': case 'K': v <<= 10; end++; break;
    case 'm': case 'M': v <<= 20; end++; break;
    case 'g': case 'G': v <<= 30; end++; break;
    default: break;
    }
    if (*end && !strchr(stops, *end)) die("not a size: ", s);
    return (size_t)v;
}

/* A decimal integer of at least `min`; else dies with `what` and the text. */
static long parse_int(const char *s, long min, const char *what) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < min) die(what, s);
    return v;
}

#endif
