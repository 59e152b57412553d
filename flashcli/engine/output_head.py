"""The output head of model.Model (a mixin): logits and log-probabilities of last-layer outputs,
resident or streamed in pieces (a piece multiplied as it is read), and a pass that takes the
streamed pieces without computing them."""

from __future__ import annotations

import numpy as np


class OutputHead:
    def head_logprobs(self, x: np.ndarray, targets: np.ndarray, rows: int = 32) -> np.ndarray:
        """log p(targets[j]) under the logits of last-layer outputs x [r, d] (from eval(...,
        hidden=True)): [r]. A resident head computes `rows` rows of logits at a time (the
        plan's logits rows), then each row's log-sum-exp in float64 a row at a time: float64
        temporaries of `rows` rows of a 128k vocabulary were 100 MB the plan did not count,
        enough for the OOM killer at a budget's cgroup limit. A streamed head runs its pieces
        once, keeping a running log-sum-exp per row, so that a vocabulary of 150k costs
        megabytes, not a gigabyte."""
        targets = np.asarray(targets)
        if not self.head_streamed:
            out = np.empty(len(x))
            for r in range(0, len(x), rows):
                for i, z in enumerate(self._resident_logits(x[r : r + rows])):
                    z = z.astype(np.float64)
                    m = z.max()
                    out[r + i] = z[targets[r + i]] - (m + np.log(np.exp(z - m).sum()))
            return out
        best = np.full(len(x), -np.inf)
        total = np.zeros(len(x))
        picked = np.zeros(len(x))
        for first, z in self._head_pieces(x, self._rows_units(len(x))):
            z = z.astype(np.float64)
            m = np.maximum(best, z.max(-1))
            total = total * np.exp(best - m) + np.exp(z - m[:, None]).sum(-1)
            best = m
            inside = (targets >= first) & (targets < first + z.shape[1])
            picked[inside] = z[np.flatnonzero(inside), targets[inside] - first]
        return picked - (best + np.log(total))

    def head_logits(self, x: np.ndarray) -> np.ndarray:
        """Logits [r, vocab] of last-layer outputs x [r, d] (from eval(..., hidden=True))."""
        if self.head_streamed:
            return self._streamed_head(x, self._rows_units(len(x)))
        return self._resident_logits(x).copy()

    def _resident_logits(self, x: np.ndarray) -> np.ndarray:
        """The resident head's logits of x: its graph's output buffer itself (the plan's logits
        rows), valid until the head runs again."""
        units = self._rows_units(len(x))
        if self._head is None or self._head[0] != units:
            g = self.new_graph(max_nodes=16 + 4 * len(x))
            x_t, x_in = g.input(self.cfg.d_model, len(x))
            y = g.output(self.head(g, x_t, units))
            g.finish()
            self._head = (units, g, x_in, g.array(y))
        _, g, x_in, y = self._head
        x_in[...] = x
        g.compute()
        return y

    def _rows_units(self, r: int) -> tuple:
        """The units of r rows of one sequence (decode_state.BatchInputs)."""
        return ((0, r, r > 1 and not self.exact),)

    def _streamed_head(self, x: np.ndarray, units: tuple) -> np.ndarray:
        """Logits [r, vocab] of x [r, d], the head's pieces streamed one after another."""
        logits = np.empty((len(x), self.cfg.n_vocab), np.float32)
        for first, z in self._head_pieces(x, units):
            logits[:, first : first + z.shape[1]] = z
        return logits

    def _head_pieces(self, x: np.ndarray, units: tuple):
        """(first row, logits [r, rows] of that piece of the head) for each streamed piece, in
        order: the normed input is computed once, then each piece is multiplied when read."""
        if self._piece_graphs is None or self._piece_graphs[0] != units:
            self._piece_graphs = None
            self._piece_graphs = (units, self._build_head_pieces(len(x), units))
        _, (norm_g, norm_in, normed, pieces) = self._piece_graphs
        norm_in[...] = x
        norm_g.compute()
        for name, first, g, h_in, y in pieces:
            h_in[...] = normed
            self.stream.ready_one(name, g)
            g.compute()
            self.stream.done_one()
            yield first, y

    def _build_head_pieces(self, r: int, units: tuple):
        cfg = self.cfg
        norm_g = self.new_graph(max_nodes=16)
        x_t, norm_in = norm_g.input(cfg.d_model, r)
        normed_t = norm_g.output(self._norm(norm_g, x_t, self.weights.output_norm))
        norm_g.finish()
        normed = norm_g.array(normed_t)
        pieces = []
        for name in self.stream.head_names():
            m = self.stream.matrices[name]
            g = self.new_graph(max_nodes=16 + 3 * r)
            h_t, h_in = g.input(cfg.d_model, r)
            y = g.output(self.logits(g, self.product(g, m, h_t, units)))
            g.finish()
            pieces.append((name, m.first_row, g, h_in, g.array(y)))
        return norm_g, norm_in, normed, pieces

    def _skip_head(self):
        """A pass that wants no logits still takes the head's pieces from the stream, in order."""
        for name in self.stream.head_names():
            self.stream.ready_one(name, None)
            self.stream.done_one()
