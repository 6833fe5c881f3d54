"""The tables the fused SLBI kernels read, shared by the kernels and the Python layer.

A bucket's work is cut into *chunks*; one Triton program (or one unit of OpenMP work of
the CPU kernel) handles one chunk of ``TILE_ROWS`` (``CPU_TILE_ROWS``) rows. A row is one
filter ``Z_g`` for group-penalised tensors (so a chunk owns whole groups and can reduce
``‖Z_g‖`` without atomics) and a run of ``TILE_ROW_LEN`` (``CPU_TILE_ROW_LEN``)
consecutive elements otherwise. A chunk never crosses a parameter boundary. The C kernel
gets these constants as ``-D`` defines (``cpu_step.py``).
"""

# Columns of the chunk table (int64; int32 for the Triton kernel while offsets fit).
CHUNK_START = 0  # flat offset of the chunk's first element
CHUNK_ROWS = 1  # number of rows in the chunk (<= TILE_ROWS)
CHUNK_ROW_LEN = 2  # elements per row: the group size, or TILE_ROW_LEN / CPU_TILE_ROW_LEN
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

# Tile geometry of the Triton kernel: TILE_ROWS rows per program, TILE_COLS columns per
# inner iteration. A row of an l1/"none" tensor is TILE_ROW_LEN elements (a multiple of
# TILE_COLS: the program loops over it), so one program covers 64K elements of such a
# tensor and the table stays O(filters + elements / 64K).
TILE_ROWS = 8
TILE_COLS = 256
TILE_ROW_LEN = 8192

# The CPU kernel's chunks are units of OpenMP work: CPU_TILE_ROWS filters, or
# CPU_TILE_ROWS * CPU_TILE_ROW_LEN elements of an l1/"none" tensor.
CPU_TILE_ROWS = 32
CPU_TILE_ROW_LEN = 2048
