//! Judging completions with the eval kit's answer-parsing cascade, for new completions and for
//! re-judging the texts of a saved samples file against its records.

use std::collections::HashMap;

use medrl_vqa::reward::eval_kit_judge;
use medrl_vqa::VqaRecord;

use crate::error::{EvalError, Result};
use crate::samples::{ItemSamples, Judged};

/// Judges one completion of `record` with the kit's cascade (`eval_kit_judge`).
pub fn judge(text: String, record: &VqaRecord) -> Judged {
    let j = eval_kit_judge(&text, &record.gold());
    Judged { text, prediction: j.prediction, correct: j.correct, format_ok: j.used_answer_tag }
}

/// The samples-file entry of `record` with its judged greedy and sampled completions.
pub fn item_for(record: &VqaRecord, greedy: Judged, samples: Vec<Judged>) -> ItemSamples {
    ItemSamples {
        id: record.id.clone(),
        dataset: record.dataset.clone(),
        modality: record.modality.clone(),
        answer_label: record.answer_label.clone(),
        answer: record.answer.clone(),
        greedy,
        samples,
    }
}

/// Re-parses every saved completion against its record (matched by id), so that a samples
/// file's predictions, correctness and format flags come from this kit's cascade whatever
/// wrote them. Returns how many judgements changed.
pub fn rejudge(items: &mut [ItemSamples], records: &[VqaRecord]) -> Result<usize> {
    let by_id: HashMap<&str, &VqaRecord> = records.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut changed = 0;
    for item in items.iter_mut() {
        let record = by_id
            .get(item.id.as_str())
            .ok_or_else(|| EvalError::Data(format!("samples item {:?} has no record with that id in the data file", item.id)))?;
        for slot in std::iter::once(&mut item.greedy).chain(item.samples.iter_mut()) {
            let fresh = judge(std::mem::take(&mut slot.text), record);
            if fresh.prediction != slot.prediction || fresh.correct != slot.correct || fresh.format_ok != slot.format_ok {
                changed += 1;
            }
            *slot = fresh;
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VqaRecord {
        VqaRecord {
            id: "q".into(),
            dataset: "d".into(),
            modality: "xray".into(),
            images: vec![],
            question: "Which?".into(),
            options: vec!["left".into(), "right".into(), "both".into()],
            answer_label: Some("B".into()),
            answer: "right".into(),
        }
    }

    #[test]
    fn judges_with_the_kit_cascade() {
        let r = record();
        assert_eq!(
            judge("<think>hm</think><answer>b</answer>".into(), &r),
            Judged { text: "<think>hm</think><answer>b</answer>".into(), prediction: "B".into(), correct: true, format_ok: true }
        );
        let j = judge("Final answer: C".into(), &r);
        assert_eq!((j.prediction.as_str(), j.correct, j.format_ok), ("C", false, false));
    }

    #[test]
    fn rejudge_overwrites_stale_flags() -> Result<()> {
        let r = record();
        let stale = Judged { text: "<answer>B</answer>".into(), prediction: "".into(), correct: false, format_ok: false };
        let mut items = vec![item_for(&r, stale.clone(), vec![stale.clone(), judge("<answer>A</answer>".into(), &r)])];
        assert_eq!(rejudge(&mut items, std::slice::from_ref(&r))?, 2);
        assert!(items[0].greedy.correct && items[0].samples[0].correct && !items[0].samples[1].correct);
        let mut orphan = vec![ItemSamples { id: "other".into(), ..items[0].clone() }];
        assert!(rejudge(&mut orphan, &[r]).is_err());
        Ok(())
    }
}
