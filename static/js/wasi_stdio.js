// stdin, stdout and stderr of a WASI run in the browser, as a program sees them on a native
// node (wasmtime's in-memory stdio, worker/wasi_run.py): a stream of unknown file type, not a
// terminal, not seekable, with only the right to read (stdin) or write (stdout, stderr).
//
// The shim's own stdio (an OpenFile over a File for stdin, ConsoleStdout for the others)
// answers differently: stdin a seekable regular file of known size, stdout a terminal. A program
// that asks (isatty, fstat, lseek; Rust's `is_terminal`, a read sized by fstat, a second pass
// over stdin) would print other bytes on a browser than on a native node, and replication would
// find the two nodes disputing. The codes below are what wasmtime returns, call by call
// (tests/test_wasm_mixed.py holds a browser and a native worker to them).

const ERRNO_SUCCESS = 0;
const ERRNO_BADF = 8;
const ERRNO_SPIPE = 70;
const FILETYPE_UNKNOWN = 0;
const RIGHTS_FD_READ = 1n << 1n;
const RIGHTS_FD_WRITE = 1n << 6n;

/** fdstat as wasmtime gives it for a stdio stream: unknown type, no flags, one right. */
class StreamFdstat {
  constructor(rights) {
    this.rights = rights;
  }

  write_bytes(view, ptr) {
    for (let k = 0; k < 24; k += 8) view.setBigUint64(ptr + k, 0n, true);
    view.setUint8(ptr, FILETYPE_UNKNOWN);
    view.setBigUint64(ptr + 8, this.rights, true);
    view.setBigUint64(ptr + 16, this.rights, true);
  }
}

/** filestat of a stdio stream: all zero (the shim's Filestat writes its times at wrong offsets). */
const ZERO_FILESTAT = {
  write_bytes(view, ptr) {
    for (let k = 0; k < 64; k += 8) view.setBigUint64(ptr + k, 0n, true);
  },
};

const classes = new WeakMap(); // the shim's Fd -> {Stdin, Output}

function define(Fd) {
  /** What both kinds of stream answer alike. */
  class Stream extends Fd {
    fd_fdstat_get() {
      return { ret: ERRNO_SUCCESS, fdstat: new StreamFdstat(this.rights) };
    }
    fd_filestat_get() {
      return { ret: ERRNO_SUCCESS, filestat: ZERO_FILESTAT };
    }
    fd_seek() {
      return { ret: ERRNO_SPIPE, offset: 0n };
    }
    fd_tell() {
      return { ret: ERRNO_SPIPE, offset: 0n };
    }
    fd_allocate() {
      return ERRNO_BADF;
    }
    fd_sync() {
      return ERRNO_BADF; // fd_datasync too: the shim calls fd_sync for both
    }
    fd_fdstat_set_flags() {
      return ERRNO_BADF;
    }
    fd_filestat_set_size() {
      return ERRNO_BADF;
    }
    fd_filestat_set_times() {
      return ERRNO_BADF;
    }
    fd_readdir_single() {
      return { ret: ERRNO_BADF, dirent: null };
    }
    fd_prestat_get() {
      return { ret: ERRNO_BADF, prestat: null };
    }
    fd_read() {
      return { ret: ERRNO_BADF, data: new Uint8Array() };
    }
    fd_pread() {
      return { ret: ERRNO_BADF, data: new Uint8Array() };
    }
    fd_write() {
      return { ret: ERRNO_BADF, nwritten: 0 };
    }
    fd_pwrite() {
      return { ret: ERRNO_BADF, nwritten: 0 };
    }
  }

  class Stdin extends Stream {
    constructor(bytes) {
      super();
      this.bytes = bytes;
      this.pos = 0;
      this.rights = RIGHTS_FD_READ;
    }
    fd_read(size) {
      const data = this.bytes.slice(this.pos, this.pos + size);
      this.pos += data.length;
      return { ret: ERRNO_SUCCESS, data };
    }
    fd_pread() {
      return { ret: ERRNO_SPIPE, data: new Uint8Array() };
    }
  }

  class Output extends Stream {
    constructor(write) {
      super();
      this.write = write;
      this.rights = RIGHTS_FD_WRITE;
    }
    fd_write(data) {
      this.write(data);
      return { ret: ERRNO_SUCCESS, nwritten: data.byteLength };
    }
    fd_pwrite() {
      return { ret: ERRNO_SPIPE, nwritten: 0 };
    }
  }

  return { Stdin, Output };
}

/**
 * The three stdio descriptors of one run: `stdin` (bytes) to read, `onStdout` and `onStderr`
 * called with each chunk written. `Fd` is the vendored shim's base class.
 */
export function stdioFds(Fd, stdin, onStdout, onStderr) {
  if (!classes.has(Fd)) classes.set(Fd, define(Fd));
  const { Stdin, Output } = classes.get(Fd);
  return [new Stdin(stdin), new Output(onStdout), new Output(onStderr)];
}

/** fd_advise as wasmtime answers it for stdio (the shim says yes to any open descriptor). */
export function fdAdvise() {
  return ERRNO_BADF;
}
