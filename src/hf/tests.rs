use super::*;
use crate::hf::export::write_model;
use crate::tokenizer::Specials;
use crate::train::backend::Cpu;
use burn::tensor::Distribution;

const SPECIALS: Specials = Specials {
    pad: 0,
    unk: 1,
    cls: 2,
    sep: 3,
    mask: 4,
};

fn config(family: Family) -> BackboneConfig {
    let hf = HfConfig {
        family,
        vocab_size: 40,
        d_model: 16,
        layers: 2,
        heads: 4,
        d_ff: 24,
        positions: 20,
        type_vocab: if family == Family::Roberta { 1 } else { 2 },
        norm_eps: if family == Family::Gpt2 { 1e-5 } else { 1e-12 },
        gelu_tanh: family == Family::Gpt2,
        tie_word_embeddings: false,
    };
    hf.backbone(0.0, SPECIALS.sep)
}

/// A model whose every parameter (LayerNorms included) is random, so a mix-up shows.
fn random_parts(cfg: &BackboneConfig, head: HeadKind) -> Parts<Cpu> {
    let _rng = crate::model::rng_lock();
    let device = Default::default();
    let mut parts = Parts {
        backbone: cfg.init::<Cpu>(&device),
        lm_head: Some(cfg.lm_head(&device)),
        classifier: Some(cfg.classifier_head(3, false, &device)),
        head,
    };
    each_param(cfg.family, &mut parts, &mut |_, _, slot| {
        let dims = slot_shape(&slot);
        let n: usize = dims.iter().product();
        let values: Vec<f32> =
            Tensor::<Cpu, 1>::random([n], Distribution::Normal(0.0, 1.0), &device)
                .into_data()
                .to_vec()
                .unwrap();
        set_slot(slot, values, &device);
    });
    parts
}

fn written(family: Family, head: HeadKind) -> (tempfile::TempDir, BackboneConfig, Parts<Cpu>) {
    let cfg = config(family);
    let parts = random_parts(&cfg, head);
    let dir = tempfile::tempdir().unwrap();
    let copy = Parts {
        backbone: parts.backbone.clone(),
        lm_head: parts.lm_head.clone(),
        classifier: parts.classifier.clone(),
        head,
    };
    write_model(
        dir.path(),
        family,
        &cfg,
        SPECIALS,
        &["a".into(), "b".into(), "c".into()],
        copy,
    )
    .unwrap();
    (dir, cfg, parts)
}

fn without_pooler(mut t: BTreeMap<String, HfTensor>) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    t.retain(|k, _| !k.starts_with("pooler."));
    t.into_iter().map(|(k, v)| (k, (v.shape, v.data))).collect()
}

/// xrun → Hugging Face → xrun gives back every tensor exactly, for each family, and the written
/// config.json describes the same backbone.
#[test]
fn round_trip_gives_identical_tensors() {
    for family in [Family::Bert, Family::Roberta, Family::Gpt2] {
        for head in [HeadKind::Lm, HeadKind::None] {
            let (dir, cfg, mut parts) = written(family, head);
            let read = read_config(dir.path()).unwrap();
            assert_eq!(
                read.backbone(0.0, SPECIALS.sep).parameters(),
                cfg.parameters()
            );
            let imported = import::<Cpu>(dir.path(), &cfg, &Default::default()).unwrap();
            assert_eq!(imported.lm_head.is_some(), head == HeadKind::Lm);
            let mut back = Parts {
                backbone: imported.backbone,
                lm_head: imported.lm_head,
                classifier: None,
                head: if head == HeadKind::Lm {
                    HeadKind::Lm
                } else {
                    HeadKind::None
                },
            };
            let original = hf_tensors(family, &mut parts);
            let again = hf_tensors(family, &mut back);
            if head == HeadKind::Lm {
                // Masked-LM models are written without the pooler.
                assert_eq!(
                    without_pooler(original),
                    without_pooler(again),
                    "{family:?}"
                );
            } else {
                let o: BTreeMap<_, _> = original
                    .into_iter()
                    .map(|(k, v)| (k, (v.shape, v.data)))
                    .collect();
                let a: BTreeMap<_, _> = again
                    .into_iter()
                    .map(|(k, v)| (k, (v.shape, v.data)))
                    .collect();
                assert_eq!(o, a, "{family:?}");
            }
        }
    }
}

/// GPT-2's fused `c_attn` is the query, key and value projections side by side.
#[test]
fn gpt2_fused_attention_splits_into_query_key_value() {
    let (dir, _, parts) = written(Family::Gpt2, HeadKind::None);
    let tensors = read_tensors(dir.path()).unwrap();
    let fused = &tensors["h.1.attn.c_attn.weight"];
    assert_eq!(fused.shape, [16, 48]);
    let key: Vec<f32> = parts.backbone.blocks[1]
        .attention
        .key
        .weight
        .val()
        .into_data()
        .to_vec()
        .unwrap();
    // Row 5 of the key projection is columns 16..32 of the fused row 5.
    assert_eq!(fused.data[5 * 48 + 16..5 * 48 + 32], key[5 * 16..6 * 16]);
}

fn rewrite(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, HfTensor>)) {
    let mut t = read_tensors(dir).unwrap();
    edit(&mut t);
    write_safetensors(&dir.join("model.safetensors"), &t).unwrap();
}

fn import_error(dir: &Path, cfg: &BackboneConfig) -> String {
    match import::<Cpu>(dir, cfg, &Default::default()) {
        Ok(_) => panic!("the import should fail"),
        Err(e) => e,
    }
}

/// Missing, unexpected and misshapen tensors are listed by name; nothing loads partially.
#[test]
fn bad_checkpoints_name_their_tensors() {
    let (dir, cfg, _) = written(Family::Bert, HeadKind::Lm);
    rewrite(dir.path(), |t| {
        t.remove("bert.encoder.layer.1.output.dense.bias");
        t.insert(
            "bert.encoder.layer.1.crossattention.self.query.weight".into(),
            HfTensor {
                shape: vec![16, 16],
                data: vec![0.0; 256],
            },
        );
        t.get_mut("bert.encoder.layer.0.intermediate.dense.weight")
            .unwrap()
            .shape = vec![12, 32];
    });
    let e = import_error(dir.path(), &cfg);
    assert!(
        e.contains("missing tensors: encoder.layer.1.output.dense.bias"),
        "{e}"
    );
    assert!(
        e.contains("encoder.layer.0.intermediate.dense.weight: the checkpoint has [12, 32], config.json implies [24, 16]"),
        "{e}"
    );
    assert!(
        e.contains("unexpected tensors (not part of a bert model xrun knows): encoder.layer.1.crossattention.self.query.weight"),
        "{e}"
    );
    assert!(e.contains("nothing was loaded"), "{e}");
}

#[test]
fn unsupported_configs_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let write = |json: &str| std::fs::write(dir.path().join("config.json"), json).unwrap();
    write(r#"{"model_type": "t5", "d_model": 8}"#);
    let e = read_config(dir.path()).unwrap_err();
    assert!(
        e.contains("config.json: `model_type` = \"t5\" is not supported"),
        "{e}"
    );
    write(r#"{"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1}"#);
    let e = read_config(dir.path()).unwrap_err();
    assert!(e.contains("key `num_attention_heads` is missing"), "{e}");
    write(
        r#"{"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 8,
            "position_embedding_type": "relative_key"}"#,
    );
    let e = read_config(dir.path()).unwrap_err();
    assert!(
        e.contains("`position_embedding_type` = \"relative_key\""),
        "{e}"
    );
    let e = match read_tensors(dir.path()) {
        Ok(_) => panic!("no weights"),
        Err(e) => e,
    };
    assert!(e.contains("no model.safetensors"), "{e}");
}

/// Buffers and the next-sentence head are left out with a note, not loaded and not an error;
/// a checkpoint without an LM head imports its backbone.
#[test]
fn buffers_and_unused_heads_are_noted() {
    let (dir, cfg, _) = written(Family::Bert, HeadKind::None);
    rewrite(dir.path(), |t| {
        t.insert(
            "embeddings.position_ids".into(),
            HfTensor {
                shape: vec![1, 20],
                data: vec![0.0; 20],
            },
        );
        t.insert(
            "cls.seq_relationship.bias".into(),
            HfTensor {
                shape: vec![2],
                data: vec![0.0; 2],
            },
        );
    });
    let imported = import::<Cpu>(dir.path(), &cfg, &Default::default()).unwrap();
    assert!(imported.lm_head.is_none());
    let notes = imported.notes.join("\n");
    assert!(
        notes.contains("embeddings.position_ids (a buffer)"),
        "{notes}"
    );
    assert!(
        notes.contains("cls.seq_relationship.bias (BERT's next-sentence head)"),
        "{notes}"
    );
    assert!(notes.contains("no LM head"), "{notes}");
}
