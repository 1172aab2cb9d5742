"""README quick start: AWQ INT4 on a small Llama built from a config (CPU, ~1 minute)."""

import tempfile

import torch
from torchao.quantization import quantize_
from transformers import LlamaConfig, LlamaForCausalLM

from awq_ao import awq_config, get_state, whole_model

model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=1000)).eval()
calibration = [torch.randint(0, 1000, (4, 128)) for _ in range(4)]

quantize_(model, awq_config(step="prepare", bits=4, group_size=64), filter_fn=whole_model)
with torch.no_grad():
    for batch in calibration:
        model(batch)
quantize_(model, awq_config(bits=4, group_size=64), filter_fn=whole_model)  # prints the report

print(get_state(model).report.kind_counts())           # {'norm': 4, 'linear': 4}
compiled = torch.compile(model, fullgraph=True)
print(compiled(calibration[0], use_cache=False).logits.shape)

# save and load with the usual transformers calls (awq_ao is imported, so transformers knows it)
with tempfile.TemporaryDirectory() as out:
    model.save_pretrained(out)
    reloaded = LlamaForCausalLM.from_pretrained(out)
    with torch.no_grad():
        print(torch.equal(reloaded(calibration[0]).logits, model(calibration[0]).logits))  # True
