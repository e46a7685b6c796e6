"""Each process puts a value in the coordinator's store and reads everyone's (no GPU needed)."""
import spmd

st = spmd.distributed.initialize()
store = spmd.distributed.store()
store.set(f"value/{st.process_index}", str(10 * st.process_index).encode())
seen = [int(store.get(f"value/{r}", timeout=20)) for r in range(st.process_count)]
print(f"rank {st.process_index} of {st.process_count} backend {st.backend} launcher "
      f"{st.launcher} sees {seen}", flush=True)
