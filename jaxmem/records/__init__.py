"""Records of a run on disk: the run directory (:mod:`.rundir`), the record store and the lazy
:class:`Records` (:mod:`.store`), and orbax checkpoints (:mod:`.checkpoints`, the only importer of
orbax)."""

from jaxmem.records.checkpoints import ChunkCheckpoint, kept_param_models, load_model_params, save_params
from jaxmem.records.rundir import (
    CHECKPOINTS, CHUNKS, DESIGN, EVENTS, EXPORT_KEYS, PARAMS, FORMAT_VERSION, MANIFEST, RowBlocks, RunDir, append_event, atomic_path,
    export_records, first_line, identity_differences, make_dirs, read_events, utc_now, write_bytes_atomic, write_json_atomic,
    write_npz_atomic)
from jaxmem.records.store import (
    RECORD_AXES, NpzMember, Records, npz_member, npz_members, record_axes, records_from_chunks, unpack_bit_records)

__all__ = [
    "CHECKPOINTS", "CHUNKS", "ChunkCheckpoint", "PARAMS", "first_line", "make_dirs", "DESIGN", "EVENTS", "EXPORT_KEYS", "FORMAT_VERSION", "MANIFEST", "RECORD_AXES",
    "Records", "RowBlocks", "RunDir", "append_event", "atomic_path", "export_records", "identity_differences",
    "kept_param_models", "load_model_params", "NpzMember", "npz_member", "npz_members", "read_events", "record_axes",
    "records_from_chunks", "save_params", "unpack_bit_records", "utc_now", "write_bytes_atomic",
    "write_json_atomic", "write_npz_atomic",
]
