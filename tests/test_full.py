import minipeft as mp


def test_counts_and_print_format(tiny_model, capsys):
    total = sum(p.numel() for p in tiny_model.parameters())
    mp.freeze(tiny_model)
    assert mp.trainable_parameters(tiny_model) == (0, total)
    tiny_model.head.weight.requires_grad_(True)
    n = tiny_model.head.weight.numel()  # 41 * 32 = 1,312
    assert mp.trainable_parameters(tiny_model) == (1312, total)
    mp.print_trainable_parameters(tiny_model)
    out = capsys.readouterr().out.strip()
    assert out == f"trainable params: 1,312 || all params: {total:,} || trainable%: {100 * n / total:.4f}"
    mp.full_finetune(tiny_model)
    assert mp.trainable_parameters(tiny_model) == (total, total)


def test_peft_print_format_example(capsys):
    # PEFT's documented format, reproduced for 1,234 of 5,678 parameters
    import torch
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.zeros(1234))
    m.b = torch.nn.Parameter(torch.zeros(5678 - 1234), requires_grad=False)
    mp.print_trainable_parameters(m)
    assert capsys.readouterr().out.strip() == "trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330"
