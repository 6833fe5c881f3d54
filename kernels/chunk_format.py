"""The tables the fused SLBI kernel reads, shared by the kernel and the Python layer.

A bucket's work is cut into *chunks*; one Triton program handles one chunk, a tile of
``TILE_ROWS`` rows. A row is one filter ``Z_g`` for group-penalised tensors (so a program
owns whole groups and can reduce ``‖Z_g‖`` without atomics) and a run of ``TILE_COLS``
consecutive elements otherwise. A chunk never crosses a parameter boundary.
"""

# Columns of the int64 chunk table, one row per chunk.
CHUNK_START = 0  # flat offset of the chunk's first element
CHUNK_ROWS = 1  # number of rows in the chunk (<= TILE_ROWS)
CHUNK_ROW_LEN = 2  # elements per row: the group size, or TILE_COLS
CHUNK_END = 3  # flat offset one past the parameter's last element
CHUNK_SLOT = 4  # index of the parameter in its bucket (for its flags)
CHUNK_HPARAM_ROW = 5  # row of the hyper-parameter table (the param group)
CHUNK_PENALTY = 6  # one of PENALTY_CODES
CHUNK_NORM_OFFSET = 7  # index of the chunk's first group norm (group penalty), else 0
CHUNK_FIELDS = 8

# Columns of the float32 hyper-parameter table, one row per param group.
HP_LR = 0
HP_KAPPA = 1
HP_MU = 2
HP_LAM = 3
HP_MOMENTUM = 4
HP_DAMPENING = 5
HP_WEIGHT_DECAY = 6
# 1.0 when the group keeps a momentum buffer (momentum != 0 as a Python number): a tiny ρ
# can round to 0 in float32, and the kernel must still store v as the torch backend does.
HP_USE_MOMENTUM = 7
HPARAM_FIELDS = 8  # 8 floats (32 bytes) per row

# Bits of the per-parameter int32 flag word.
FLAG_ACTIVE = 1  # the parameter received a gradient since the last zero_grad()
FLAG_MOMENTUM_READY = 2  # its momentum buffer holds v_t (else v_{t+1} = u)

PENALTY_CODES = {"none": 0, "l1": 1, "group": 2}

# Tile geometry: TILE_ROWS rows per program, TILE_COLS columns per inner iteration.
TILE_ROWS = 8
TILE_COLS = 256

# The CPU kernel's chunks are units of OpenMP work, not GPU programs, so they are larger:
# CPU_TILE_ROWS filters, or CPU_TILE_ROWS * CPU_TILE_COLS elements of an l1/"none" tensor
# (a smaller table: 2 bytes per filter instead of 8).
CPU_TILE_ROWS = 32
CPU_TILE_COLS = 2048
