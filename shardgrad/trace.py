import os, time
_f = open(f"/tmp/prof/trace.{os.getpid()}", "a", buffering=1) if os.environ.get("SG_TRACE") else None
def T(label):
    if _f: _f.write(f"{time.monotonic():.6f} {label}\n")
