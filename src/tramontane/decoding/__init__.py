"""The decoding core both front ends share: sampling, structured-output masks, stops, per-sequence state,
and the offline generation loop (the serving engine drives the same `SequenceState`s)."""
