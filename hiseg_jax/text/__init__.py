"""Text side of HIPIE: Flax BERT and CLIP, their weight converters, tokenizer, prompt utilities.

`load_bert(path) -> (module, params)`: `module.apply({'params': params},
input_ids, attention_mask)` is BERT's [B, T, H] last hidden state.
`load_clip(path) -> (module, params)`: a `CLIP` whose methods
(`get_image_features`, `get_text_features`, `get_dense_image_features`,
`get_mask_embeddings`, `similarity_logits`) are called with
`module.apply(..., method=...)`.
"""

from hiseg_jax.text.bert import Bert, BertConfig
from hiseg_jax.text.bert_convert import load_bert
from hiseg_jax.text.clip import CLIP, CLIPConfig, CLIPTowerConfig, mask_pool
from hiseg_jax.text.clip_convert import load_clip
from hiseg_jax.text.prompts import (ClassPrompt, PromptChunks, build_class_prompt,
                                    chunk_token_ids, clean_class_name, pool_sentence_features,
                                    pool_token_features, pool_token_logits, tokenize_sentences,
                                    unchunk_tokens)
from hiseg_jax.text.tokenizer import load_bert_tokenizer
