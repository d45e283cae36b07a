/* The C test suite of libefa: every part of the C ABI from a C program, on every rank.
 * Built by efa-capi/tests/c_suite.rs with -Wall -Wextra -Werror and run under efarun and
 * Open MPI's mpirun (2 and 4 ranks) and once under valgrind. Prints
 * "efa-c-suite: rank R of N: K checks passed" at the end; any failed check prints what and
 * where and exits 1. */
#include <efa.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks = 0, me = -1;

#define CHECK(cond, ...)                                                             \
  do {                                                                               \
    checks++;                                                                        \
    if (!(cond)) {                                                                   \
      fprintf(stderr, "efa-c-suite: rank %d: FAILED at %s:%d: %s: ", me, __FILE__,   \
              __LINE__, #cond);                                                      \
      fprintf(stderr, __VA_ARGS__);                                                  \
      fprintf(stderr, " (last error: %s)\n", efa_last_error());                      \
      exit(1);                                                                       \
    }                                                                                \
  } while (0)
#define OK(call) CHECK((call) == EFA_SUCCESS, "%s", #call)

static void test_errors(efa_comm *c, int n) {
  int x = 0;
  /* NULL pointers are refused with EFA_ERR_NULL and a text naming the argument. */
  CHECK(efa_comm_rank(NULL, &x) == EFA_ERR_NULL, "NULL comm");
  CHECK(strstr(efa_last_error(), "comm is NULL") != NULL, "text: %s", efa_last_error());
  CHECK(efa_comm_rank(c, NULL) == EFA_ERR_NULL, "NULL rank");
  CHECK(efa_send(c, NULL, 4, EFA_INT32, 0, 1) == EFA_ERR_NULL, "NULL buf");
  /* An invalid rank carries the Rust error's text. */
  int v = 1;
  CHECK(efa_send(c, &v, 1, EFA_INT32, n + 5, 1) == EFA_ERR_RANK, "bad rank");
  CHECK(strstr(efa_last_error(), "rank") != NULL, "text: %s", efa_last_error());
  CHECK(efa_send(c, &v, 1, 42, 0, 1) == EFA_ERR_ARG, "bad datatype");
  CHECK(strstr(efa_last_error(), "datatype 42") != NULL, "text: %s", efa_last_error());
  CHECK(efa_allreduce(c, EFA_IN_PLACE, &v, 1, EFA_INT32, 99) == EFA_ERR_ARG, "bad op");
  CHECK(efa_send(c, &v, 1, EFA_INT32, 0, -5) == EFA_ERR_TAG, "negative tag");
  CHECK(efa_allreduce(c, &v, &v, 1, EFA_INT32, EFA_SUM) == EFA_ERR_ARG, "overlap");
  /* Misaligned buffer for its datatype. */
  double d[2];
  CHECK(efa_send(c, (char *)d + 1, 1, EFA_DOUBLE, 0, 1) == EFA_ERR_ARG, "misaligned");
  CHECK(strcmp(efa_strerror(EFA_ERR_TIMEOUT), "timed out") == 0, "strerror");
  CHECK(strcmp(efa_strerror(12345), "unknown efa error code") == 0, "strerror unknown");
  char small[8];
  size_t need = 0;
  OK(efa_last_error_copy(small, sizeof small, &need));
  CHECK(strlen(small) == 7 && need == strlen(efa_last_error()) + 1, "copy %zu", need);
  size_t sz = 0;
  OK(efa_type_size(EFA_BFLOAT16, &sz));
  CHECK(sz == 2, "bf16 size %zu", sz);
  /* Bad buffers, one check for all (data, counts, request and status arrays, text). */
  CHECK(efa_send(c, &v, SIZE_MAX / 2, EFA_INT32, 0, 1) == EFA_ERR_ARG, "count * 4 overflows");
  CHECK(strstr(efa_last_error(), "overflow") != NULL, "text: %s", efa_last_error());
  CHECK(efa_allgatherv(c, &v, 1, d, NULL, EFA_INT32) == EFA_ERR_NULL, "NULL recvcounts");
  CHECK(strstr(efa_last_error(), "recvcounts") != NULL, "text: %s", efa_last_error());
  CHECK(efa_waitall(2, NULL, NULL) == EFA_ERR_NULL, "NULL request array");
  CHECK(strstr(efa_last_error(), "requests") != NULL, "text: %s", efa_last_error());
  efa_request *nulls[2] = {NULL, NULL};
  efa_status sts[2];
  CHECK(efa_waitall(SIZE_MAX / 4, nulls, NULL) == EFA_ERR_ARG, "request array overflows");
  CHECK(efa_waitany(SIZE_MAX / 4, nulls, &x, NULL) == EFA_ERR_ARG, "waitany array overflows");
  CHECK(efa_testall(SIZE_MAX / 4, nulls, &x, NULL) == EFA_ERR_ARG, "testall array overflows");
  CHECK(efa_waitall(SIZE_MAX / 16, nulls, sts) == EFA_ERR_ARG, "status array overflows");
  CHECK(strstr(efa_last_error(), "statuses") != NULL, "text: %s", efa_last_error());
  OK(efa_waitall(2, nulls, sts));
  CHECK(sts[1].source == EFA_ANY_SOURCE && sts[1].error == EFA_SUCCESS, "empty statuses");
  int tr = 0;
  CHECK(efa_route(c, 0, &tr, NULL, 16, NULL) == EFA_ERR_NULL, "NULL reason with a length");
  CHECK(strstr(efa_last_error(), "reason") != NULL, "text: %s", efa_last_error());
  char tiny[4];
  size_t full = 0;
  OK(efa_route(c, 0, &tr, tiny, sizeof tiny, &full));
  CHECK(strlen(tiny) == 3 && full > sizeof tiny, "truncated reason %zu", full);
  CHECK(efa_last_error_copy(NULL, 8, NULL) == EFA_ERR_NULL, "NULL text buffer");
  /* A NULL request pointer target is a no-op wait. */
  efa_request *none = NULL;
  efa_status st;
  OK(efa_wait(&none, &st));
  CHECK(st.source == EFA_ANY_SOURCE, "empty status");
}

static void test_p2p(efa_comm *c, int n) {
  int next = (me + 1) % n, prev = (me + n - 1) % n;
  /* Blocking ring with wildcards. */
  int64_t out[16], in[16];
  for (int i = 0; i < 16; i++) out[i] = me * 100 + i;
  efa_request *sreq = NULL;
  OK(efa_isend(c, out, 16, EFA_INT64, next, 7, &sreq));
  efa_status st;
  OK(efa_recv(c, in, 16, EFA_INT64, EFA_ANY_SOURCE, EFA_ANY_TAG, &st));
  OK(efa_wait(&sreq, NULL));
  CHECK(sreq == NULL, "wait sets NULL");
  CHECK(st.source == prev && st.tag == 7 && st.bytes == 16 * 8, "status %d %d %zu", st.source,
        st.tag, st.bytes);
  int cnt = 0;
  OK(efa_get_count(&st, EFA_INT64, &cnt));
  CHECK(cnt == 16, "count %d", cnt);
  for (int i = 0; i < 16; i++) CHECK(in[i] == prev * 100 + i, "in[%d]=%ld", i, (long)in[i]);

  /* Non-blocking both ways, waitany then waitall. */
  float fa[1000], fb[1000];
  for (int i = 0; i < 1000; i++) fa[i] = (float)(me + i);
  efa_request *reqs[2] = {NULL, NULL};
  OK(efa_irecv(c, fb, 1000, EFA_FLOAT, prev, 3, &reqs[0]));
  OK(efa_isend(c, fa, 1000, EFA_FLOAT, next, 3, &reqs[1]));
  int idx = -1;
  OK(efa_waitany(2, reqs, &idx, &st));
  CHECK(idx == 0 || idx == 1, "index %d", idx);
  CHECK(reqs[idx] == NULL, "waitany sets NULL");
  efa_status sts[2];
  OK(efa_waitall(2, reqs, sts));
  for (int i = 0; i < 1000; i++) CHECK(fb[i] == (float)(prev + i), "fb[%d]", i);
  OK(efa_waitany(2, reqs, &idx, NULL));
  CHECK(idx == EFA_UNDEFINED, "all NULL gives EFA_UNDEFINED: %d", idx);

  /* A large message (rendezvous) with test polling. */
  size_t big = 1 << 20;
  uint8_t *bs = malloc(big), *br = malloc(big);
  for (size_t i = 0; i < big; i++) bs[i] = (uint8_t)(i * 7 + me);
  efa_request *r = NULL;
  OK(efa_irecv(c, br, big, EFA_UINT8, prev, 11, &r));
  OK(efa_send(c, bs, big, EFA_UINT8, next, 11));
  int flag = 0;
  while (!flag) OK(efa_test(&r, &flag, &st));
  CHECK(r == NULL && st.bytes == big, "test completed %zu", st.bytes);
  for (size_t i = 0; i < big; i += 4093) CHECK(br[i] == (uint8_t)(i * 7 + prev), "br[%zu]", i);
  free(bs);
  free(br);

  /* Truncation is reported with the Rust error's text. */
  int32_t t3[3] = {1, 2, 3}, t1[1];
  OK(efa_isend(c, t3, 3, EFA_INT32, next, 12, &sreq));
  CHECK(efa_recv(c, t1, 1, EFA_INT32, prev, 12, NULL) == EFA_ERR_TRUNCATED, "truncated");
  CHECK(strlen(efa_last_error()) > 10, "truncation text: %s", efa_last_error());
  OK(efa_wait(&sreq, NULL));
  /* A message that is not whole elements of the receive's datatype (3 bytes into int32) is
   * refused, with efa-core's text, by recv, irecv + wait, sendrecv and mrecv alike. */
  uint8_t b3[3] = {1, 2, 3};
  int32_t w2[2] = {0, 0};
  OK(efa_isend(c, b3, 3, EFA_UINT8, next, 13, &sreq));
  CHECK(efa_recv(c, w2, 2, EFA_INT32, prev, 13, NULL) == EFA_ERR_TRUNCATED, "3 bytes as int32");
  CHECK(strstr(efa_last_error(), "not a whole number of 4-byte elements") != NULL, "text: %s",
        efa_last_error());
  OK(efa_wait(&sreq, NULL));
  OK(efa_isend(c, b3, 3, EFA_UINT8, next, 14, &sreq));
  OK(efa_irecv(c, w2, 2, EFA_INT32, prev, 14, &r));
  CHECK(efa_wait(&r, NULL) == EFA_ERR_TRUNCATED, "irecv of 3 bytes as int32");
  OK(efa_wait(&sreq, NULL));
  CHECK(efa_sendrecv(c, b3, 3, EFA_UINT8, next, 15, w2, 2, EFA_INT32, prev, 15, NULL) ==
            EFA_ERR_TRUNCATED,
        "sendrecv of 3 bytes as int32");
  OK(efa_isend(c, b3, 3, EFA_UINT8, next, 16, &sreq));
  efa_message *m3 = NULL;
  OK(efa_mprobe(c, prev, 16, &m3, NULL));
  CHECK(efa_mrecv(w2, 2, EFA_INT32, &m3, NULL) == EFA_ERR_TRUNCATED, "mrecv of 3 bytes");
  OK(efa_wait(&sreq, NULL));

  /* Cancel an unmatched receive. */
  OK(efa_irecv(c, t1, 1, EFA_INT32, prev, 999, &r));
  int cancelled = 0;
  OK(efa_cancel(r, &cancelled));
  CHECK(cancelled == 1, "cancelled");
  CHECK(efa_wait(&r, NULL) == EFA_ERR_CANCELLED, "wait after cancel");

  /* sendrecv and probe. */
  int32_t sv = me, rv = -1;
  OK(efa_sendrecv(c, &sv, 1, EFA_INT32, next, 5, &rv, 1, EFA_INT32, prev, 5, NULL));
  CHECK(rv == prev, "sendrecv %d", rv);
  OK(efa_isend(c, t3, 3, EFA_INT32, next, 13, &sreq));
  OK(efa_probe(c, EFA_ANY_SOURCE, 13, &st));
  CHECK(st.bytes == 12 && st.source == prev, "probe %zu", st.bytes);
  OK(efa_recv(c, t3, 3, EFA_INT32, st.source, 13, NULL));
  OK(efa_wait(&sreq, NULL));

  /* Matched probe: size the buffer from the status, then receive exactly that message; a
   * message freed unreceived goes back for a later receive. */
  int32_t m5[5] = {5, 6, 7, 8, 9};
  OK(efa_isend(c, m5, 5, EFA_INT32, next, 14, &sreq));
  efa_message *msg = NULL;
  OK(efa_mprobe(c, prev, 14, &msg, &st));
  CHECK(msg != NULL && st.bytes == 20, "mprobe %zu", st.bytes);
  OK(efa_message_free(&msg));
  CHECK(msg == NULL, "message_free sets NULL");
  flag = 0;
  while (!flag) OK(efa_improbe(c, EFA_ANY_SOURCE, 14, &flag, &msg, &st));
  int32_t *mb = calloc(st.bytes / 4, 4);
  OK(efa_mrecv(mb, st.bytes / 4, EFA_INT32, &msg, &st));
  CHECK(msg == NULL && mb[0] == 5 && mb[4] == 9, "mrecv %d", mb[0]);
  free(mb);
  OK(efa_wait(&sreq, NULL));
}

static void test_coll(efa_comm *c, int n) {
  /* allreduce, every op, several datatypes, in place and out of place. */
  double d[5], dr[5];
  for (int i = 0; i < 5; i++) d[i] = me + i;
  OK(efa_allreduce(c, d, dr, 5, EFA_DOUBLE, EFA_SUM));
  for (int i = 0; i < 5; i++) CHECK(dr[i] == n * (n - 1) / 2.0 + n * i, "sum %d %f", i, dr[i]);
  int32_t iv[3] = {me + 1, -me, 7};
  OK(efa_allreduce(c, EFA_IN_PLACE, iv, 3, EFA_INT32, EFA_MAX));
  CHECK(iv[0] == n && iv[1] == 0 && iv[2] == 7, "max %d %d", iv[0], iv[1]);
  int64_t pv = me + 1;
  OK(efa_allreduce(c, EFA_IN_PLACE, &pv, 1, EFA_INT64, EFA_PROD));
  int64_t fact = 1;
  for (int i = 1; i <= n; i++) fact *= i;
  CHECK(pv == fact, "prod %ld", (long)pv);
  uint8_t mn = (uint8_t)(10 + me);
  OK(efa_allreduce(c, EFA_IN_PLACE, &mn, 1, EFA_UINT8, EFA_MIN));
  CHECK(mn == 10, "min %d", mn);
  float av = (float)me;
  OK(efa_allreduce(c, EFA_IN_PLACE, &av, 1, EFA_FLOAT, EFA_AVG));
  CHECK(av == (float)(n - 1) / 2.0f, "avg %f", av);

  /* reduce to the last rank, bcast from rank 1. */
  int root = n - 1;
  uint32_t u = (uint32_t)me, ur = 0;
  OK(efa_reduce(c, &u, me == root ? &ur : NULL, 1, EFA_UINT32, EFA_SUM, root));
  if (me == root) CHECK(ur == (uint32_t)(n * (n - 1) / 2), "reduce %u", ur);
  int32_t b[4] = {0, 0, 0, 0};
  if (me == 1) for (int i = 0; i < 4; i++) b[i] = 40 + i;
  OK(efa_bcast(c, b, 4, EFA_INT32, 1));
  CHECK(b[0] == 40 && b[3] == 43, "bcast");
  OK(efa_barrier(c));

  /* scan, exscan. */
  int32_t s = me + 1, sr = 0;
  OK(efa_scan(c, &s, &sr, 1, EFA_INT32, EFA_SUM));
  CHECK(sr == (me + 1) * (me + 2) / 2, "scan %d", sr);
  sr = -1;
  OK(efa_exscan(c, &s, &sr, 1, EFA_INT32, EFA_SUM));
  CHECK(me == 0 ? sr == -1 : sr == me * (me + 1) / 2, "exscan %d", sr);

  /* allgather(v), gather(v), scatter(v), alltoall(v), reduce_scatter_block. */
  int32_t *all = calloc((size_t)n * 2, 4);
  int32_t two[2] = {me, me * 10};
  OK(efa_allgather(c, two, all, 2, EFA_INT32));
  for (int r = 0; r < n; r++) CHECK(all[2 * r] == r && all[2 * r + 1] == r * 10, "allgather %d", r);
  size_t *counts = calloc((size_t)n, sizeof(size_t)), *displs = calloc((size_t)n, sizeof(size_t));
  size_t total = 0;
  for (int r = 0; r < n; r++) { counts[r] = (size_t)r + 1; displs[r] = total; total += counts[r]; }
  int32_t *mine = calloc((size_t)me + 1, 4), *vbuf = calloc(total, 4);
  for (int i = 0; i <= me; i++) mine[i] = me;
  OK(efa_allgatherv(c, mine, (size_t)me + 1, vbuf, counts, EFA_INT32));
  for (int r = 0; r < n; r++) CHECK(vbuf[displs[r]] == r && vbuf[displs[r] + counts[r] - 1] == r, "allgatherv %d", r);
  memset(vbuf, 0, total * 4);
  OK(efa_gatherv(c, mine, (size_t)me + 1, vbuf, counts, displs, EFA_INT32, 0));
  if (me == 0) for (int r = 0; r < n; r++) CHECK(vbuf[displs[r]] == r, "gatherv %d", r);
  memset(all, 0, (size_t)n * 8);
  OK(efa_gather(c, two, me == 0 ? all : NULL, 2, EFA_INT32, 0));
  if (me == 0) for (int r = 0; r < n; r++) CHECK(all[2 * r + 1] == r * 10, "gather %d", r);
  /* MPI style: the root in place, the others out of place, for reduce and gather. */
  int64_t rv2 = me + 1;
  OK(efa_reduce(c, me == 0 ? EFA_IN_PLACE : (const void *)&rv2, me == 0 ? &rv2 : NULL, 1,
                EFA_INT64, EFA_SUM, 0));
  if (me == 0) CHECK(rv2 == (int64_t)n * (n + 1) / 2, "reduce root in place %ld", (long)rv2);
  memset(all, 0, (size_t)n * 8);
  if (me == 0) { all[0] = 0; all[1] = 0; }
  OK(efa_gather(c, me == 0 ? EFA_IN_PLACE : (const void *)two, me == 0 ? all : NULL, 2, EFA_INT32, 0));
  if (me == 0) for (int r = 1; r < n; r++) CHECK(all[2 * r] == r && all[2 * r + 1] == r * 10, "gather root in place %d", r);
  if (me == 0) { all[0] = 0; all[1] = 0; }
  int32_t got[2] = {-1, -1};
  OK(efa_scatter(c, all, got, 2, EFA_INT32, 0));
  CHECK(got[0] == me && got[1] == me * 10, "scatter %d %d", got[0], got[1]);
  int32_t *gotv = calloc((size_t)me + 1, 4);
  OK(efa_scatterv(c, vbuf, counts, displs, gotv, (size_t)me + 1, EFA_INT32, 0));
  CHECK(gotv[0] == me && gotv[me] == me, "scatterv %d", gotv[0]);
  int32_t *a2a = calloc((size_t)n, 4), *a2ar = calloc((size_t)n, 4);
  for (int d2 = 0; d2 < n; d2++) a2a[d2] = me * 100 + d2;
  OK(efa_alltoall(c, a2a, a2ar, 1, EFA_INT32));
  for (int s2 = 0; s2 < n; s2++) CHECK(a2ar[s2] == s2 * 100 + me, "alltoall %d", s2);
  size_t *ones = calloc((size_t)n, sizeof(size_t)), *idx = calloc((size_t)n, sizeof(size_t));
  for (int r = 0; r < n; r++) { ones[r] = 1; idx[r] = (size_t)r; }
  memset(a2ar, 0, (size_t)n * 4);
  OK(efa_alltoallv(c, a2a, ones, idx, a2ar, ones, idx, EFA_INT32));
  for (int s2 = 0; s2 < n; s2++) CHECK(a2ar[s2] == s2 * 100 + me, "alltoallv %d", s2);
  int32_t *rs = calloc((size_t)n, 4);
  for (int r = 0; r < n; r++) rs[r] = r + me;
  int32_t rsr = 0;
  OK(efa_reduce_scatter_block(c, rs, &rsr, 1, EFA_INT32, EFA_SUM));
  CHECK(rsr == n * me + n * (n - 1) / 2, "reduce_scatter %d", rsr);

  /* Non-blocking collectives, several in flight, completed by waitall. */
  double nd[3] = {1.0 * me, 2.0, 3.0}, ndr[3];
  int32_t nb[2] = {me == 0 ? 5 : 0, me == 0 ? 6 : 0};
  int32_t *nag = calloc((size_t)n, 4);
  int32_t nme = me;
  efa_request *rq[6] = {NULL};
  OK(efa_iallreduce(c, nd, ndr, 3, EFA_DOUBLE, EFA_SUM, &rq[0]));
  OK(efa_ibcast(c, nb, 2, EFA_INT32, 0, &rq[1]));
  OK(efa_iallgather(c, &nme, nag, 1, EFA_INT32, &rq[2]));
  OK(efa_ibarrier(c, &rq[3]));
  int32_t nrs = 0;
  OK(efa_ireduce_scatter_block(c, rs, &nrs, 1, EFA_INT32, EFA_SUM, &rq[4]));
  int32_t nsc = 0;
  OK(efa_iscan(c, &s, &nsc, 1, EFA_INT32, EFA_SUM, &rq[5]));
  OK(efa_waitall(6, rq, NULL));
  CHECK(ndr[0] == n * (n - 1) / 2.0 && ndr[2] == 3.0 * n, "iallreduce %f", ndr[0]);
  CHECK(nb[0] == 5 && nb[1] == 6, "ibcast");
  for (int r = 0; r < n; r++) CHECK(nag[r] == r, "iallgather %d", r);
  CHECK(nrs == rsr, "ireduce_scatter %d", nrs);
  CHECK(nsc == (me + 1) * (me + 2) / 2, "iscan %d", nsc);
  int32_t ng[2] = {0};
  memset(all, 0, (size_t)n * 8);
  OK(efa_igather(c, two, me == 0 ? all : NULL, 2, EFA_INT32, 0, &rq[0]));
  OK(efa_wait(&rq[0], NULL));
  if (me == 0) for (int r = 0; r < n; r++) CHECK(all[2 * r] == r, "igather %d", r);
  OK(efa_iscatter(c, all, ng, 2, EFA_INT32, 0, &rq[0]));
  OK(efa_wait(&rq[0], NULL));
  CHECK(ng[0] == me && ng[1] == me * 10, "iscatter");
  memset(a2ar, 0, (size_t)n * 4);
  OK(efa_ialltoall(c, a2a, a2ar, 1, EFA_INT32, &rq[0]));
  OK(efa_wait(&rq[0], NULL));
  for (int s2 = 0; s2 < n; s2++) CHECK(a2ar[s2] == s2 * 100 + me, "ialltoall %d", s2);
  /* A mismatch (different counts) fails on every rank with EFA_ERR_MISMATCH. */
  double mm[2] = {0, 0};
  int rc = efa_allreduce(c, EFA_IN_PLACE, mm, me == 0 ? 1 : 2, EFA_DOUBLE, EFA_SUM);
  CHECK(rc == EFA_ERR_MISMATCH || rc == EFA_ERR_COLL_ARG, "mismatch rc %d", rc);
  free(all); free(counts); free(displs); free(mine); free(vbuf); free(gotv); free(a2a);
  free(a2ar); free(ones); free(idx); free(rs); free(nag);
}

/* Non-commutative, associative, element by element: keep the left (lower ranks') value. */
static void keep_first(void *acc, const void *x, size_t count, void *user_data) {
  (void)acc;
  (void)x;
  (void)count;
  (*(int *)user_data)++;
}

/* Keep the right (higher rank's) value. */
static void keep_last(void *acc, const void *x, size_t count, void *user_data) {
  (void)user_data;
  memcpy(acc, x, count * sizeof(int64_t));
}

static void bitor_op(void *acc, const void *x, size_t count, void *user_data) {
  (void)user_data;
  for (size_t i = 0; i < count; i++) ((uint32_t *)acc)[i] |= ((const uint32_t *)x)[i];
}

static void test_user_ops(efa_comm *c, int n) {
  /* Non-commutative operators are applied in rank order: keep_first gives rank 0's values,
   * keep_last the last rank's, and a scan with keep_last gives each rank its own. */
  int calls = 0, op = -1, last = -1;
  OK(efa_op_create(keep_first, 0, &calls, &op));
  OK(efa_op_create(keep_last, 0, NULL, &last));
  int64_t v[5], w[5];
  for (int i = 0; i < 5; i++) v[i] = w[i] = me * 10 + i;
  OK(efa_allreduce(c, EFA_IN_PLACE, v, 5, EFA_INT64, op));
  for (int i = 0; i < 5; i++) CHECK(v[i] == i, "keep_first [%d] %ld", i, (long)v[i]);
  OK(efa_allreduce(c, EFA_IN_PLACE, w, 5, EFA_INT64, last));
  for (int i = 0; i < 5; i++) CHECK(w[i] == (n - 1) * 10 + i, "keep_last [%d] %ld", i, (long)w[i]);
  for (int i = 0; i < 5; i++) w[i] = me * 10 + i;
  OK(efa_scan(c, EFA_IN_PLACE, w, 5, EFA_INT64, last));
  for (int i = 0; i < 5; i++) CHECK(w[i] == me * 10 + i, "scan keep_last [%d] %ld", i, (long)w[i]);
  /* Some ranks only pass data on; across the job the C function ran. */
  int total_calls = calls;
  OK(efa_allreduce(c, EFA_IN_PLACE, &total_calls, 1, EFA_INT32, EFA_SUM));
  CHECK(n == 1 || total_calls > 0, "the C function was called %d times", total_calls);
  OK(efa_op_free(&last));
  int64_t m[1] = {0};
  OK(efa_op_free(&op));
  CHECK(op == -1, "op_free sets -1");
  int freed = 1000000;
  CHECK(efa_allreduce(c, EFA_IN_PLACE, m, 1, EFA_INT64, freed) == EFA_ERR_ARG, "unknown op");
  int bor = -1;
  OK(efa_op_create(bitor_op, 1, NULL, &bor));
  uint32_t bits = 1u << me, bits_out = 0;
  efa_request *r = NULL;
  OK(efa_iallreduce(c, &bits, &bits_out, 1, EFA_UINT32, bor, &r));
  OK(efa_wait(&r, NULL));
  CHECK(bits_out == (1u << n) - 1, "bitor %x", bits_out);
  OK(efa_op_free(&bor));
}

/* The pair types have MPI's layout: natural alignment, an int index. */
_Static_assert(sizeof(efa_float_int) == 8 && offsetof(efa_float_int, index) == 4, "float_int");
_Static_assert(sizeof(efa_double_int) == 16 && offsetof(efa_double_int, index) == 8,
               "double_int");
_Static_assert(sizeof(efa_long_int) == 16 && offsetof(efa_long_int, index) == 8, "long_int");
_Static_assert(sizeof(efa_2int) == 8 && offsetof(efa_2int, index) == 4, "2int");

/* What a program ported from MPI declares itself for MPI_DOUBLE_INT (not efa.h's type). */
struct mpi_double_int {
  double val;
  int loc;
};
_Static_assert(sizeof(struct mpi_double_int) == sizeof(efa_double_int), "MPI layout");

/* A user operator over EFA_DOUBLE_INT sees the caller's layout: sums the values, keeps the
 * largest index. */
static void sum_keep_max_index(void *acc, const void *x, size_t count, void *user_data) {
  (void)user_data;
  struct mpi_double_int *a = acc;
  const struct mpi_double_int *b = x;
  for (size_t i = 0; i < count; i++) {
    a[i].val += b[i].val;
    if (b[i].loc > a[i].loc) a[i].loc = b[i].loc;
  }
}

static void test_minloc(efa_comm *c, int n) {
  size_t sz = 0;
  OK(efa_type_size(EFA_DOUBLE_INT, &sz));
  CHECK(sz == sizeof(efa_double_int), "double_int size %zu", sz);
  OK(efa_type_size(EFA_LONG_INT, &sz));
  CHECK(sz == sizeof(efa_long_int), "long_int size %zu", sz);
  /* [0] the same value everywhere: the lowest index wins (rank 0's).
   * [1] value me % 2: min 0 at index 0 (ties with ranks 2, ...), max 1 at index 1.
   * [2] value -me, index 100 + me: min at the last rank, max at rank 0.
   * [3] the same value, index n - me: the lowest index is the last rank's (1).
   * [4] the same value, index -1 at the last rank, me elsewhere: -1 is the lowest index
   *     (signed order, as MPI; as an unsigned number it would be the highest).
   * [5] the same value, index INT_MIN + me: the lowest is rank 0's. */
  efa_double_int d[6], lo[6], hi[6];
  memset(lo, 0x55, sizeof lo); /* the padding: MINLOC/MAXLOC leave it alone */
  for (int i = 0; i < 6; i++) {
    d[i].value = 7;
    d[i].index = me;
  }
  d[0].value = 3.5;
  d[1].value = me % 2;
  d[2].value = -me; d[2].index = 100 + me;
  d[3].index = n - me;
  d[4].index = me == n - 1 ? -1 : me;
  d[5].index = INT32_MIN + me;
  OK(efa_allreduce(c, d, lo, 6, EFA_DOUBLE_INT, EFA_MINLOC));
  OK(efa_allreduce(c, d, hi, 6, EFA_DOUBLE_INT, EFA_MAXLOC));
  CHECK(lo[0].value == 3.5 && lo[0].index == 0, "minloc tie %f %d", lo[0].value, lo[0].index);
  CHECK(hi[0].value == 3.5 && hi[0].index == 0, "maxloc tie %f %d", hi[0].value, hi[0].index);
  CHECK(lo[1].value == 0 && lo[1].index == 0, "minloc [1] %f %d", lo[1].value, lo[1].index);
  CHECK(hi[1].value == 1 && hi[1].index == 1, "maxloc [1] %f %d", hi[1].value, hi[1].index);
  CHECK(lo[2].value == -(n - 1) && lo[2].index == 100 + n - 1, "minloc [2] %d", lo[2].index);
  CHECK(hi[2].value == 0 && hi[2].index == 100, "maxloc [2] %d", hi[2].index);
  CHECK(lo[3].index == 1 && hi[3].index == 1, "tie by index %d %d", lo[3].index, hi[3].index);
  CHECK(lo[4].index == -1 && hi[4].index == -1, "negative index %d %d", lo[4].index,
        hi[4].index);
  CHECK(lo[5].index == INT32_MIN && hi[5].index == INT32_MIN, "INT_MIN %d %d", lo[5].index,
        hi[5].index);
  const unsigned char *pad = (const unsigned char *)&lo[5] + offsetof(efa_double_int, index) +
                             sizeof(int);
  CHECK(pad[0] == 0x55 && pad[3] == 0x55, "padding written: %x", pad[0]);
  /* An array of the program's own MPI-style structs, out of place, in place, non-blocking
   * (the result lands at the wait), and as plain data to a broadcast. Element i: value
   * (i + me) % n, index 10 * me - i: the minimum 0 is at rank (n - i % n) % n. */
  enum { K = 5 };
  struct mpi_double_int mine[K], best[K], ibest[K];
  for (int i = 0; i < K; i++) {
    mine[i].val = (i + me) % n;
    mine[i].loc = 10 * me - i;
  }
  OK(efa_allreduce(c, mine, best, K, EFA_DOUBLE_INT, EFA_MINLOC));
  for (int i = 0; i < K; i++) {
    int at = (n - i % n) % n;
    CHECK(best[i].val == 0 && best[i].loc == 10 * at - i, "own struct [%d]: %f %d", i,
          best[i].val, best[i].loc);
  }
  efa_request *r = NULL;
  memset(ibest, 0, sizeof ibest);
  OK(efa_iallreduce(c, mine, ibest, K, EFA_DOUBLE_INT, EFA_MAXLOC, &r));
  OK(efa_wait(&r, NULL));
  for (int i = 0; i < K; i++) {
    int at = (2 * n - 1 - i % n) % n;
    CHECK(ibest[i].val == n - 1 && ibest[i].loc == 10 * at - i, "own struct iallreduce [%d]: %f %d",
          i, ibest[i].val, ibest[i].loc);
  }
  OK(efa_allreduce(c, EFA_IN_PLACE, mine, K, EFA_DOUBLE_INT, EFA_MINLOC));
  for (int i = 0; i < K; i++)
    CHECK(mine[i].val == best[i].val && mine[i].loc == best[i].loc,
          "own struct in place [%d]: %f %d", i, mine[i].val, mine[i].loc);
  struct mpi_double_int b2[2] = {{me == 0 ? 1.5 : 0, me == 0 ? -3 : 0},
                                 {me == 0 ? 2.5 : 0, me == 0 ? 9 : 0}};
  OK(efa_bcast(c, b2, 2, EFA_DOUBLE_INT, 0));
  CHECK(b2[0].val == 1.5 && b2[0].loc == -3 && b2[1].val == 2.5 && b2[1].loc == 9,
        "bcast own struct %f %d %f %d", b2[0].val, b2[0].loc, b2[1].val, b2[1].loc);
  /* A user operator over the pair datatype sees MPI's layout (and the caller's indices). */
  int sumop = -1;
  OK(efa_op_create(sum_keep_max_index, 1, NULL, &sumop));
  struct mpi_double_int u[2] = {{me, -me}, {1, me}};
  OK(efa_allreduce(c, EFA_IN_PLACE, u, 2, EFA_DOUBLE_INT, sumop));
  CHECK(u[0].val == n * (n - 1) / 2 && u[0].loc == 0 && u[1].val == n && u[1].loc == n - 1,
        "user op over pairs %f %d %f %d", u[0].val, u[0].loc, u[1].val, u[1].loc);
  OK(efa_op_free(&sumop));
  /* 2INT in place; LONG_INT reduced to the last rank (blocking and not); FLOAT_INT
   * non-blocking; scans. */
  efa_2int iv = {me / 2, me};
  OK(efa_allreduce(c, EFA_IN_PLACE, &iv, 1, EFA_2INT, EFA_MAXLOC));
  CHECK(iv.value == (n - 1) / 2 && iv.index == (n - 1) / 2 * 2, "2int %d %d", iv.value,
        iv.index);
  efa_long_int lv = {-(long)me * 1000000000000L, me}, lr = {0, 0}, ilr = {0, 0};
  OK(efa_reduce(c, &lv, me == n - 1 ? &lr : NULL, 1, EFA_LONG_INT, EFA_MINLOC, n - 1));
  if (me == n - 1)
    CHECK(lr.value == -(long)(n - 1) * 1000000000000L && lr.index == n - 1, "long_int %d",
          lr.index);
  OK(efa_ireduce(c, &lv, me == n - 1 ? &ilr : NULL, 1, EFA_LONG_INT, EFA_MAXLOC, n - 1, &r));
  OK(efa_wait(&r, NULL));
  if (me == n - 1) CHECK(ilr.value == 0 && ilr.index == 0, "ireduce long_int %d", ilr.index);
  efa_float_int fv = {1.0f, n - me}, fr = {0, 0};
  OK(efa_iallreduce(c, &fv, &fr, 1, EFA_FLOAT_INT, EFA_MINLOC, &r));
  OK(efa_wait(&r, NULL));
  CHECK(fr.value == 1.0f && fr.index == 1, "ifloat_int %f %d", fr.value, fr.index);
  efa_2int sv = {n - me, me}, sr = {0, 0};
  OK(efa_scan(c, &sv, &sr, 1, EFA_2INT, EFA_MINLOC));
  CHECK(sr.value == n - me && sr.index == me, "scan minloc %d %d", sr.value, sr.index);
  /* Exscan with negative indices: rank r > 0 gets the max of ranks 0..r-1 (value 5 at each,
   * index -r: the lowest index is the highest of those ranks); rank 0's recvbuf is kept. */
  efa_2int ev = {5, -me}, er = {-42, -43};
  OK(efa_iexscan(c, &ev, &er, 1, EFA_2INT, EFA_MAXLOC, &r));
  OK(efa_wait(&r, NULL));
  if (me == 0)
    CHECK(er.value == -42 && er.index == -43, "exscan rank 0 written %d %d", er.value, er.index);
  else
    CHECK(er.value == 5 && er.index == -(me - 1), "exscan maxloc %d %d", er.value, er.index);
  /* Pair datatypes of the same size but different types on different ranks: a mismatch
   * on every rank, and the buffer is left as it was. */
  efa_long_int mm = {5, -5};
  int rc = efa_allreduce(c, EFA_IN_PLACE, &mm, 1, me == 0 ? EFA_LONG_INT : EFA_DOUBLE_INT,
                         EFA_MINLOC);
  CHECK(rc == EFA_ERR_MISMATCH && mm.value == 5 && mm.index == -5, "pair mismatch rc %d %d",
        rc, mm.index);
  /* A pair with an arithmetic op, or MINLOC with a plain type: EFA_ERR_ARG on every rank. */
  CHECK(efa_allreduce(c, EFA_IN_PLACE, lo, 4, EFA_DOUBLE_INT, EFA_SUM) == EFA_ERR_ARG,
        "pair with EFA_SUM");
  CHECK(strstr(efa_last_error(), "pair datatype") != NULL, "text: %s", efa_last_error());
  double plain = 1;
  CHECK(efa_allreduce(c, EFA_IN_PLACE, &plain, 1, EFA_DOUBLE, EFA_MAXLOC) == EFA_ERR_ARG,
        "EFA_MAXLOC with a plain type");
  CHECK(efa_iallreduce(c, &plain, lo, 1, EFA_DOUBLE, EFA_MINLOC, &r) == EFA_ERR_ARG && r == NULL,
        "EFA_MINLOC with a plain type, non-blocking");
  /* A double pair is aligned as a double: a buffer off by 4 bytes is refused. */
  CHECK(efa_allreduce(c, EFA_IN_PLACE, (char *)lo + 4, 1, EFA_DOUBLE_INT, EFA_MINLOC) ==
            EFA_ERR_ARG,
        "misaligned pair");
  /* Pairs are plain data to every other call. */
  efa_2int b = {me == 0 ? 42 : 0, me == 0 ? -7 : 0};
  OK(efa_bcast(c, &b, 1, EFA_2INT, 0));
  CHECK(b.value == 42 && b.index == -7, "bcast 2int %d %d", b.value, b.index);
}

static void test_comms(efa_comm *c, int n) {
  efa_comm *d = NULL, *half = NULL;
  OK(efa_comm_dup(c, &d));
  int r = -1, s = -1;
  OK(efa_comm_rank(d, &r));
  OK(efa_comm_size(d, &s));
  CHECK(r == me && s == n, "dup %d %d", r, s);
  int v = 1;
  OK(efa_allreduce(d, EFA_IN_PLACE, &v, 1, EFA_INT32, EFA_SUM));
  CHECK(v == n, "dup allreduce %d", v);
  OK(efa_comm_split(c, me % 2, -me, &half));
  CHECK(half != NULL, "split");
  OK(efa_comm_size(half, &s));
  OK(efa_comm_rank(half, &r));
  CHECK(s == (n + 1 - me % 2) / 2, "split size %d", s);
  int32_t w = me;
  OK(efa_allreduce(half, EFA_IN_PLACE, &w, 1, EFA_INT32, EFA_MAX));
  CHECK(r == 0 ? w == me : 1, "key orders descending: rank 0 of the half is its largest %d", w);
  efa_comm *none = (efa_comm *)&v;
  OK(efa_comm_split(c, me == 0 ? 0 : EFA_UNDEFINED, 0, &none));
  CHECK(me == 0 ? none != NULL : none == NULL, "undefined color");
  if (none) OK(efa_finalize(&none));
  OK(efa_finalize(&half));
  OK(efa_finalize(&d));
  CHECK(d == NULL, "finalize sets NULL");

  int t = 0;
  char reason[256];
  size_t needed = 0;
  OK(efa_route(c, (me + 1) % n, &t, reason, sizeof reason, &needed));
  CHECK(t == EFA_TRANSPORT_SHM && strncmp(reason, "shm: same host", 14) == 0, "route %d %s", t, reason);
  CHECK(needed == strlen(reason) + 1, "needed %zu", needed);
  OK(efa_route(c, me, &t, reason, sizeof reason, NULL));
  CHECK(strncmp(reason, "self", 4) == 0 || strncmp(reason, "shm", 3) == 0, "self route %s", reason);
}

static void test_rma(efa_comm *c, int n) {
  efa_win *w = NULL;
  size_t bytes = 64 * (size_t)n;
  int rc = efa_win_create(c, bytes, EFA_WIN_READ_WRITE, &w);
  if (rc == EFA_ERR_RMA) {
    fprintf(stderr, "SKIPPED: c_suite rma: %s\n", efa_last_error());
    return;
  }
  OK(rc);
  size_t sz = 0;
  OK(efa_win_size(w, &sz));
  CHECK(sz == bytes, "win size %zu", sz);
  int next = (me + 1) % n, prev = (me + n - 1) % n;
  uint64_t v = 1000 + (uint64_t)me;
  OK(efa_put(w, next, 8 * (size_t)me, &v, 8));
  OK(efa_win_fence(w));
  uint64_t got = 0;
  OK(efa_win_read_local(w, 8 * (size_t)prev, &got, 8));
  CHECK(got == 1000 + (uint64_t)prev, "put landed %lu", (unsigned long)got);
  uint64_t rd = 0;
  efa_request *r = NULL;
  OK(efa_iget(w, next, 8 * (size_t)me, &rd, 8, &r));
  CHECK(efa_win_free(&w) == EFA_ERR_PENDING, "free refused while a request is in flight");
  OK(efa_wait(&r, NULL));
  CHECK(rd == v, "get %lu", (unsigned long)rd);
  CHECK(efa_put(w, next, bytes, &v, 8) == EFA_ERR_RMA, "out of bounds");
  OK(efa_win_fence(w));
  OK(efa_win_free(&w));
  CHECK(w == NULL, "win free sets NULL");
}

int main(void) {
  efa_comm *c = NULL;
  int rc = efa_init(&c);
  if (rc != EFA_SUCCESS) {
    fprintf(stderr, "efa-c-suite: efa_init: %s: %s\n", efa_strerror(rc), efa_last_error());
    return 1;
  }
  int n = 0;
  OK(efa_comm_rank(c, &me));
  OK(efa_comm_size(c, &n));
  test_errors(c, n);
  test_p2p(c, n);
  test_coll(c, n);
  test_user_ops(c, n);
  test_minloc(c, n);
  test_comms(c, n);
  test_rma(c, n);
  OK(efa_finalize(&c));
  printf("efa-c-suite: rank %d of %d: %d checks passed\n", me, n, checks);
  return 0;
}
