// Tokenizers read from GGUF metadata (tokenizer.ggml.*), following llama.cpp's llama-vocab:
//  - "llama": SentencePiece BPE (scores, byte fallback <0xNN>, space prefix "▁"),
//  - "gpt2":  byte-level BPE (merges) with the pre-tokenizer named by tokenizer.ggml.pre.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gguf.h"

namespace ps {

class Tokenizer {
public:
    virtual ~Tokenizer() = default;

    // Builds the tokenizer the file describes; throws ps::Error for a missing or unknown
    // tokenizer.ggml.model / tokenizer.ggml.pre, or inconsistent arrays.
    static std::unique_ptr<Tokenizer> from_gguf(const GGUFFile& f);

    // Text (UTF-8) to ids. add_bos adds the BOS token; parse_special makes the text of special
    // and control tokens (e.g. "<|im_start|>") map to their ids instead of being tokenized as
    // plain text. add_eos follows tokenizer.ggml.add_eos_token when add_special is true.
    virtual std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special) const = 0;

    // The bytes one token stands for (byte-fallback and byte-level tokens decoded to raw bytes,
    // "▁" to a space). Control tokens (BOS, EOS, ...) give "" unless render_special.
    virtual std::string token_to_piece(int32_t id, bool render_special = false) const = 0;
    // Concatenated pieces; with SentencePiece the leading space of the first piece is removed
    // when a BOS precedes it, like llama.cpp / sentencepiece's decode.
    virtual std::string decode(const std::vector<int32_t>& ids, bool render_special = false) const = 0;

    int32_t n_vocab() const { return int32_t(tokens_.size()); }
    int32_t bos() const { return bos_; }  // -1 if none
    int32_t eos() const { return eos_; }  // -1 if none
    bool add_bos_default() const { return add_bos_; }
    bool add_eos_default() const { return add_eos_; }
    // End of generation: EOS, EOT, or any token llama.cpp would treat as ending a turn.
    bool is_eog(int32_t id) const;
    const std::string& token_text(int32_t id) const { return tokens_.at(size_t(id)); }

protected:
    std::vector<std::string> tokens_;
    std::vector<int32_t> token_type_;  // llama.cpp's: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    std::vector<int32_t> eog_ids_;
    int32_t bos_ = -1, eos_ = -1;
    bool add_bos_ = false, add_eos_ = false;
};

}  // namespace ps
