"""Probe behind the nixl plane's tensor-parallel design: can rank 0's NIXL agent register a worker's KV cache
that rank 0 only maps over CUDA IPC, and can a peer's agent WRITE into it?

Three processes on one GPU: the owner allocates X (a worker's cache), the holder imports X over CUDA IPC
(torch.multiprocessing, as rank 0 gets its workers' caches) and registers it with its agent, the peer WRITEs
its own 7-filled tensor into X through the holder's agent metadata. Prints what each side sees.
Measured 2026-12-05 on an H100 (bench/results/logs/kv_transfer-h100-20261205-tp.log.gz): registration OK,
WRITE DONE, all bytes seen by the holder and the owner.

    python bench/nixl_ipc_probe.py      # needs a GPU and the nixl package
"""

import time

import numpy as np
import torch
import torch.multiprocessing as mp

N = 1 << 20
FILL = 7


def owner(q_out, q_done) -> None:
    x = torch.zeros(N, device="cuda", dtype=torch.uint8)
    q_out.put(x)
    q_done.get()  # x lives until the holder is done
    print("owner: X sum after the peer's write", int(x.sum().item()), flush=True)


def peer(meta: bytes, addr: int, dev: int) -> None:
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent("peer", nixl_agent_config(backends=["UCX"]))
    z = torch.full((N,), FILL, device="cuda", dtype=torch.uint8)
    agent.register_memory([z])
    name = agent.add_remote_agent(meta)
    local = np.array([[z.data_ptr(), N, z.device.index]], dtype=np.uint64)
    remote = np.array([[addr, N, dev]], dtype=np.uint64)
    handle = agent.initialize_xfer(
        "WRITE", agent.get_xfer_descs(local, "VRAM"), agent.get_xfer_descs(remote, "VRAM"), name
    )
    state, start = agent.transfer(handle), time.time()
    while state not in ("DONE", "ERR") and time.time() - start < 10:
        state = agent.check_xfer_state(handle)
        time.sleep(0.001)
    print("peer: write into the imported tensor ->", state, flush=True)


def main() -> None:
    from nixl._api import nixl_agent, nixl_agent_config

    ctx = mp.get_context("spawn")
    q_out, q_done = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=owner, args=(q_out, q_done))
    proc.start()
    x = q_out.get()  # imported over CUDA IPC
    holder = nixl_agent("holder", nixl_agent_config(backends=["UCX"]))
    try:
        holder.register_memory([x])
        print("holder: registering the imported tensor OK", flush=True)
        writer = ctx.Process(target=peer, args=(holder.get_agent_metadata(), x.data_ptr(), x.device.index))
        writer.start()
        writer.join()
        torch.cuda.synchronize()
        print("holder: X sum seen here", int(x.sum().item()), "want", N * FILL, flush=True)
    except Exception as exc:  # noqa: BLE001 - the probe reports what failed
        print("holder: FAILED", repr(exc), flush=True)
    finally:
        q_done.put(1)
        proc.join()


if __name__ == "__main__":
    main()
