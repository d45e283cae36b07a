! Fortran through the same C ABI (bind(C)): an allreduce of doubles, and a MAXLOC over
! (double, int) pairs.
!
!   gfortran allreduce.f90 $(pkg-config --libs efa) -o allreduce_f && efarun -n 4 ./allreduce_f
module efa
  use, intrinsic :: iso_c_binding
  implicit none
  ! Values of efa.h's enums.
  integer(c_int), parameter :: EFA_SUCCESS = 0, EFA_DOUBLE = 9, EFA_SUM = 0
  integer(c_int), parameter :: EFA_DOUBLE_INT = 11, EFA_MAXLOC = 6
  ! efa.h's efa_double_int (EFA_DOUBLE_INT, MPI_DOUBLE_INT): a bind(C) type has the C layout,
  ! 16 bytes with the index at 8.
  type, bind(C) :: double_int_pair
    real(c_double) :: value
    integer(c_int) :: index
  end type
  interface
    integer(c_int) function efa_init(comm) bind(C, name="efa_init")
      import :: c_int, c_ptr
      type(c_ptr), intent(out) :: comm
    end function
    integer(c_int) function efa_finalize(comm) bind(C, name="efa_finalize")
      import :: c_int, c_ptr
      type(c_ptr), intent(inout) :: comm
    end function
    integer(c_int) function efa_comm_rank(comm, rank) bind(C, name="efa_comm_rank")
      import :: c_int, c_ptr
      type(c_ptr), value :: comm
      integer(c_int), intent(out) :: rank
    end function
    integer(c_int) function efa_comm_size(comm, size) bind(C, name="efa_comm_size")
      import :: c_int, c_ptr
      type(c_ptr), value :: comm
      integer(c_int), intent(out) :: size
    end function
    integer(c_int) function efa_allreduce(comm, sendbuf, recvbuf, count, datatype, op) &
        bind(C, name="efa_allreduce")
      import :: c_int, c_ptr, c_size_t
      type(c_ptr), value :: comm, sendbuf, recvbuf
      integer(c_size_t), value :: count
      integer(c_int), value :: datatype, op
    end function
    integer(c_int) function efa_last_error_copy(buf, len, needed) bind(C, name="efa_last_error_copy")
      import :: c_int, c_size_t, c_char, c_ptr
      character(kind=c_char), dimension(*) :: buf
      integer(c_size_t), value :: len
      type(c_ptr), value :: needed
    end function
  end interface
contains
  subroutine check(rc, what)
    integer(c_int), intent(in) :: rc
    character(*), intent(in) :: what
    character(kind=c_char) :: msg(512)
    integer(c_int) :: ignored
    if (rc /= EFA_SUCCESS) then
      ignored = efa_last_error_copy(msg, int(size(msg), c_size_t), c_null_ptr)
      print *, what, " failed with code ", rc, ": ", msg(1:min(200, size(msg)))
      stop 1
    end if
  end subroutine
end module

program allreduce_f
  use efa
  implicit none
  type(c_ptr) :: comm
  integer(c_int) :: rank, nranks, i
  real(c_double), target :: x(100), s(100)
  type(double_int_pair), target :: mine, best
  logical :: good
  call check(efa_init(comm), "efa_init")
  call check(efa_comm_rank(comm, rank), "efa_comm_rank")
  call check(efa_comm_size(comm, nranks), "efa_comm_size")
  do i = 1, 100
    x(i) = real(rank + i, c_double)
  end do
  call check(efa_allreduce(comm, c_loc(x), c_loc(s), int(100, c_size_t), EFA_DOUBLE, EFA_SUM), &
             "efa_allreduce")
  good = .true.
  do i = 1, 100
    good = good .and. abs(s(i) - real(nranks * (nranks - 1) / 2 + nranks * i, c_double)) < 1d-9
  end do
  ! The largest value (rank / 2) is the last rank's, shared with the one before it when
  ! the number of ranks is even; the index is -rank, and the lowest index among them wins
  ! (signed, as MPI's): the last rank's, -(nranks - 1).
  mine = double_int_pair(real(rank / 2, c_double), -rank)
  call check(efa_allreduce(comm, c_loc(mine), c_loc(best), int(1, c_size_t), EFA_DOUBLE_INT, &
                           EFA_MAXLOC), "efa_allreduce MAXLOC")
  good = good .and. abs(best%value - real((nranks - 1) / 2, c_double)) < 0.5d0 &
              .and. best%index == -(nranks - 1)
  if (good) then
    print '(a,i0,a)', "rank ", rank, ": fortran allreduce ok"
  else
    print '(a,i0,a)', "rank ", rank, ": fortran allreduce WRONG"
  end if
  call check(efa_finalize(comm), "efa_finalize")
  if (.not. good) stop 1
end program
