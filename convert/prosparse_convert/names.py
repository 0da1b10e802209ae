"""GGUF key and tensor names, in one table (llama.cpp's names plus our prosparse.* namespace).

Nothing else in the converter spells a key or a tensor name.
"""

# llama.cpp's per-architecture keys; "{arch}" is replaced by general.architecture.
CONTEXT_LENGTH = "{arch}.context_length"
EMBEDDING_LENGTH = "{arch}.embedding_length"
BLOCK_COUNT = "{arch}.block_count"
FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
HEAD_COUNT = "{arch}.attention.head_count"
HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
ROPE_FREQ_BASE = "{arch}.rope.freq_base"
ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
VOCAB_SIZE = "{arch}.vocab_size"
# MiniCPM (llama.cpp's convert_hf_to_gguf.py MiniCPMModel writes these, unfolded).
EMBEDDING_SCALE = "{arch}.embedding_scale"
RESIDUAL_SCALE = "{arch}.residual_scale"
LOGIT_SCALE = "{arch}.logit_scale"

GENERAL_ARCHITECTURE = "general.architecture"
GENERAL_NAME = "general.name"
GENERAL_FILE_TYPE = "general.file_type"
GENERAL_QUANTIZATION_VERSION = "general.quantization_version"
CHAT_TEMPLATE = "tokenizer.chat_template"

# Our namespace (docs/design.md "The GGUF contract").
PS_ACTIVATION = "prosparse.activation"
PS_ACTIVATION_THRESHOLD = "prosparse.activation_threshold"
PS_LAYER_THRESHOLDS = "prosparse.layer_thresholds"
PS_NEURON_ORDER = "prosparse.neuron_order"
PS_PREDICTOR_THRESHOLD = "prosparse.predictor.threshold"
PS_PREDICTOR_LAYER_THRESHOLDS = "prosparse.predictor.layer_thresholds"  # f32[n_layer], logit cut-offs
PS_PREDICTOR_ALWAYS_ON = "prosparse.predictor.always_on"  # i32[n_layer], neurons [0, k) always run
# PowerInfer's files carry this instead of a prosparse key.
PWI_SPARSE_THRESHOLD = "powerinfer.sparse_threshold"

TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"

ATTN_NORM = "blk.{i}.attn_norm.weight"
ATTN_Q = "blk.{i}.attn_q.weight"
ATTN_K = "blk.{i}.attn_k.weight"
ATTN_V = "blk.{i}.attn_v.weight"
ATTN_OUT = "blk.{i}.attn_output.weight"
FFN_NORM = "blk.{i}.ffn_norm.weight"
FFN_GATE = "blk.{i}.ffn_gate.weight"
FFN_UP = "blk.{i}.ffn_up.weight"
FFN_DOWN = "blk.{i}.ffn_down.weight"
FFN_DOWN_T = "blk.{i}.ffn_down_t.weight"   # neuron-major down projection, [n_ff, n_embd] in numpy
FC1 = "blk.{i}.fc1.weight"                 # predictor, [R, n_embd] in numpy
FC2 = "blk.{i}.fc2.weight"                 # predictor, [n_ff, R] in numpy
FFN_ACT_FREQ = "blk.{i}.ffn_act_freq"      # f32 [n_ff]

ACTIVATIONS = ("silu", "relu", "fatrelu")
SPARSE_ACTIVATIONS = ("relu", "fatrelu")


def key(template: str, arch: str) -> str:
    return template.format(arch=arch)


def blk(template: str, i: int) -> str:
    return template.format(i=i)
