/* Allreduce: every rank contributes a vector; all get the sum (blocking), then the maximum
 * (non-blocking, overlapped with local work).
 *
 *   cc allreduce.c $(pkg-config --cflags --libs efa) -o allreduce && efarun -n 4 ./allreduce
 */
#include <efa.h>
#include <stdio.h>
#include <stdlib.h>

#define TRY(call)                                                                      \
  do {                                                                                 \
    int rc_ = (call);                                                                  \
    if (rc_ != EFA_SUCCESS) {                                                          \
      fprintf(stderr, "%s failed: %s: %s\n", #call, efa_strerror(rc_), efa_last_error()); \
      exit(1);                                                                         \
    }                                                                                  \
  } while (0)

enum { N = 1 << 16 };

int main(void) {
  efa_comm *comm;
  int rank, size;
  TRY(efa_init(&comm));
  TRY(efa_comm_rank(comm, &rank));
  TRY(efa_comm_size(comm, &size));
  float *x = malloc(N * sizeof *x), *sum = malloc(N * sizeof *sum);
  for (int i = 0; i < N; i++) x[i] = (float)(rank + i % 7);
  TRY(efa_allreduce(comm, x, sum, N, EFA_FLOAT, EFA_SUM));
  int bad = 0;
  for (int i = 0; i < N; i++)
    bad += sum[i] != (float)(size * (size - 1) / 2 + size * (i % 7));
  efa_request *req;
  int32_t m = rank * 3;
  TRY(efa_iallreduce(comm, EFA_IN_PLACE, &m, 1, EFA_INT32, EFA_MAX, &req));
  /* ... local work while the reduction runs ... */
  TRY(efa_wait(&req, NULL));
  bad += m != (size - 1) * 3;
  printf("allreduce: rank %d of %d: %d floats summed, max %d: %s\n", rank, size, N, m,
         bad ? "WRONG" : "ok");
  free(x);
  free(sum);
  TRY(efa_finalize(&comm));
  return bad != 0;
}
