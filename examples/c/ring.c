/* Ring: each rank passes a token around the ring, adding its rank; rank 0 checks the sum.
 *
 *   cc ring.c $(pkg-config --cflags --libs efa) -o ring && efarun -n 4 ./ring
 *   (or: mpirun -n 4 ./ring)
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

int main(void) {
  efa_comm *comm;
  int rank, size;
  TRY(efa_init(&comm));
  TRY(efa_comm_rank(comm, &rank));
  TRY(efa_comm_size(comm, &size));
  int next = (rank + 1) % size, prev = (rank + size - 1) % size;
  int64_t token = 0;
  efa_status st;
  if (rank == 0) {
    TRY(efa_send(comm, &token, 1, EFA_INT64, next, 1));
    TRY(efa_recv(comm, &token, 1, EFA_INT64, prev, 1, &st));
  } else {
    TRY(efa_recv(comm, &token, 1, EFA_INT64, EFA_ANY_SOURCE, EFA_ANY_TAG, &st));
    token += rank;
    TRY(efa_send(comm, &token, 1, EFA_INT64, next, 1));
  }
  int t;
  char why[128];
  TRY(efa_route(comm, next, &t, why, sizeof why, NULL));
  int64_t want = (int64_t)size * (size - 1) / 2;
  printf("ring: rank %d got the token from %d; route to %d: %s%s\n", rank, st.source, next, why,
         rank == 0 ? (token == want ? "; sum ok" : "; sum WRONG") : "; ok");
  TRY(efa_finalize(&comm));
  return rank == 0 && token != want;
}
