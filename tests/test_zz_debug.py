import time, json
from test_worker import *


def test_dbg(controller, tmp_path, r, workers):
    size, tile, max_iter = 512, 16, 1000
    victim = Worker(controller, tmp_path / "victim", "--cores", "2")
    workers.append(victim)
    victim.wait_connected()
    proc = submit(
        controller,
        tmp_path,
        "--width",
        str(size),
        "--height",
        str(size),
        "--tile",
        str(tile),
        "--max-iter",
        str(max_iter),
    )
    job_id = wait_progress(r, 40)
    victim.proc.kill()
    victim.proc.wait()
    rescuer = Worker(controller, tmp_path / "rescuer", "--cores", "2", "--name", "rescuer")
    workers.append(rescuer)
    rescuer.wait_connected()
    for i in range(4):
        time.sleep(2)
        print("job", r.hgetall(keys.job(job_id)))
        print("xlen", r.xlen(keys.TASKS), r.xinfo_groups(keys.TASKS))
        print("consumers", r.xinfo_consumers(keys.TASKS, keys.NODES_GROUP))
        print("stats", r.hgetall(keys.STATS))
    print(rescuer.text())
    print(controller.logs())
    proc.kill()
    proc.wait()
    assert False
