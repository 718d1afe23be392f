"""One rank of a multi-process test run (launched by tests/test_dist.py like torchrun would:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment).

usage: python dist_worker.py RESULT_JSON [--nan-at STEP --nan-rank R]
       [--outlier-at STEP --outlier-rank R] -- <llmpy train flags>
Writes the rank's losses, skipped steps and a hash of its final parameters to RESULT_JSON.
"""

import hashlib
import json
import os
import sys

import numpy as np


def main():
    out = sys.argv[1]
    sep = sys.argv.index("--")
    opts, args = sys.argv[2:sep], sys.argv[sep + 1:]
    nan_at = int(opts[opts.index("--nan-at") + 1]) if "--nan-at" in opts else -1
    nan_rank = int(opts[opts.index("--nan-rank") + 1]) if "--nan-rank" in opts else -1
    rank = int(os.environ.get("RANK", "0"))
    out_at = int(opts[opts.index("--outlier-at") + 1]) if "--outlier-at" in opts else -1
    out_rank = int(opts[opts.index("--outlier-rank") + 1]) if "--outlier-rank" in opts else -1
    if rank == out_rank:  # this rank alone sees a loss z-score of 100 at step out_at
        from llmpy.outlier_detector import OutlierDetector
        real_update, n = OutlierDetector.update, [0]

        def update(self, x):
            z = real_update(self, x)
            n[0] += 1
            return 100.0 if n[0] == 2 * out_at + 1 else z  # loss, then norm, every step
        OutlierDetector.update = update

    import llmpy.engines as engines
    from llmpy.settings import parse_args
    from llmpy.train import train
    real = engines.make_engine
    made = []

    def make(name, config, **o):
        e = real(name, config, **o)
        if rank == nan_rank:
            inner_backward, calls = e.backward, [0]

            def backward(grad_scale=1.0):
                nan = calls[0] == nan_at
                calls[0] += 1
                inner_backward(float("nan") if nan else grad_scale)
            e.backward = backward
        made.append(e)
        return e
    engines.make_engine = make
    s = train(*parse_args(args))
    params = made[0].get_params()
    with open(out, "w") as f:
        json.dump({"rank": rank, "losses": {str(k): v for k, v in s["losses"].items()},
                   "val_losses": {str(k): v for k, v in s["val_losses"].items()},
                   "skipped": s["skipped"], "params_sha": hashlib.sha256(
                       params.tobytes()).hexdigest(),
                   "params_path": out + ".npy"}, f)
    np.save(out + ".npy", params)


if __name__ == "__main__":
    main()
