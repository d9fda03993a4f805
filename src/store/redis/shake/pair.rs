//! Finding and making a pair: list and scan, judge the candidates by the pairing rule,
//! then reserve -> claim -> commit (or revert), and settle reservations left behind.

use std::time::Duration;

use super::super::tag_of_coarse;
use super::{
    Me, PASSES, POOL_KEY, RedisShake, Tried,
    keys::{
        Keys, Listing, Reply, field, index_key, index_key_of, matched, ms, outcome_of, tier_code,
        word,
    },
};
use crate::{
    error::{Error, Result},
    geo::{
        band_m,
        cell::{Centres, RingCover},
        distance_key, distance_m, snapped,
    },
    id::UserId,
    shake::{
        MatchId, Outcome, Tier,
        rule::{Shaker, compatible, preference},
    },
};

impl RedisShake {
    /// Finds a partner for a new shake: lists it, scans every bucket its disk touches,
    /// and tries the candidates best first.
    pub(super) async fn drive(&self, me: &Me) -> Result<Option<Outcome>> {
        let cells = RingCover::cells_within(
            me.snapped,
            self.cfg.bucket_resolution,
            me.max_distance_m,
            Centres::Computed,
        );
        // Keys grouped by tag, the caller's own tag first (listing and scanning there is
        // one step).
        let mut tags: Vec<(String, Vec<String>)> =
            vec![(tag_of_coarse(me.bucket), vec![me.index.clone()])];
        for (cell, _) in cells {
            let key = index_key(cell);
            if key == me.index {
                continue;
            }
            let tag = tag_of_coarse(cell);
            match tags.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, keys)) => keys.push(key),
                None => tags.push((tag, vec![key])),
            }
        }
        for pass in 0..PASSES {
            let listed = self.scan(me, &tags, pass == 0).await?;
            let candidates = self.ranked(me, listed, false);
            match self.try_all(me, &candidates, Tier::Nearby).await? {
                (Some(o), _) => return Ok(Some(o)),
                (None, false) => return Ok(None),
                (None, true) => tokio::time::sleep(Duration::from_millis(1 << pass)).await,
            }
        }
        Ok(None)
    }

    /// Joins the ANYWHERE pool and tries its shakes, nearest first.
    pub(super) async fn fall_back(&self, me: &Me) -> Result<Option<Outcome>> {
        let keep = ms(self.cfg.window) + 1_000;
        let dl = self.clock.now_ms() + ms(self.cfg.window / 2);
        for pass in 0..PASSES {
            let now = self.clock.now_ms();
            let listed: Vec<String> = {
                let add = if pass == 0 { "1" } else { "0" };
                let mut cmd = redis::cmd("FCALL");
                cmd.arg("gm_sh_scan")
                    .arg(1)
                    .arg(POOL_KEY)
                    .arg(now)
                    .arg(add)
                    .arg(me.listing.encode())
                    .arg(dl)
                    .arg(keep);
                self.conn.query(&cmd).await?
            };
            let listed = listed.iter().filter_map(|s| Listing::decode(s));
            let candidates = self.ranked(me, listed, true);
            match self.try_all(me, &candidates, Tier::Anywhere).await? {
                (Some(o), _) => return Ok(Some(o)),
                (None, false) => return Ok(None),
                (None, true) => tokio::time::sleep(Duration::from_millis(1 << pass)).await,
            }
        }
        Ok(None)
    }

    /// The listed shakes `me` may pair with, best first by the rule's preference, with
    /// their distances.
    fn ranked(
        &self,
        me: &Me,
        listed: impl IntoIterator<Item = Listing>,
        anywhere: bool,
    ) -> Vec<(Listing, f64)> {
        let mut candidates: Vec<(Listing, f64)> = listed
            .into_iter()
            .filter(|l| l.user != me.listing.user)
            .filter_map(|l| {
                let d = distance_m(me.snapped, snapped(l.cell));
                self.judge(me, &l, d, anywhere).then_some((l, d))
            })
            .collect();
        candidates.sort_by_key(|(l, d)| preference(distance_key(*d), l.seq));
        candidates
    }

    /// Whether `them` may pair with `me` as far as the listing tells (their exclusions
    /// are checked by the claim itself).
    pub(super) fn judge(&self, me: &Me, them: &Listing, d: f64, anywhere: bool) -> bool {
        let Some(their_user) = UserId::stored(&them.user) else {
            return false;
        };
        let mine = Shaker {
            user: &me.user,
            max_distance_m: me.max_distance_m,
            excludes: &me.excludes,
        };
        let theirs = Shaker {
            user: &their_user,
            max_distance_m: f64::from(them.max_distance_m),
            excludes: &[],
        };
        if anywhere {
            compatible(&mine.anywhere(), &theirs.anywhere(), d)
        } else {
            compatible(&mine, &theirs, d)
        }
    }

    /// Lists the shake (first pass) and reads every bucket of the disk.
    pub(super) async fn scan(
        &self,
        me: &Me,
        tags: &[(String, Vec<String>)],
        list: bool,
    ) -> Result<Vec<Listing>> {
        let now = self.clock.now_ms();
        let keep = ms(self.cfg.window) + 1_000;
        let dl = now + ms(self.cfg.window);
        let listing = me.listing.encode();
        let call = |keys: &[String], add: bool| {
            let mut cmd = redis::cmd("FCALL");
            cmd.arg("gm_sh_scan").arg(keys.len());
            for k in keys {
                cmd.arg(k);
            }
            cmd.arg(now)
                .arg(if add { "1" } else { "0" })
                .arg(&listing)
                .arg(dl)
                .arg(keep);
            cmd
        };
        // The own tag first and alone: the other tags are read only after the shake is
        // listed, which is what makes simultaneous shakes see each other.
        let Some(((_, home), others)) = tags.split_first() else {
            return Ok(Vec::new());
        };
        let mut out: Vec<String> = self.conn.query(&call(home, list)).await?;
        for (_, keys) in others {
            out.extend(self.conn.query::<Vec<String>>(&call(keys, false)).await?);
        }
        Ok(out.iter().filter_map(|s| Listing::decode(s)).collect())
    }

    /// Tries `candidates` in order: the outcome once one pairs (or someone paired us), and
    /// whether any was busy.
    pub(super) async fn try_all(
        &self,
        me: &Me,
        candidates: &[(Listing, f64)],
        tier: Tier,
    ) -> Result<(Option<Outcome>, bool)> {
        let mut busy = false;
        for (them, d) in candidates {
            match self.pair(me, them, *d, tier).await? {
                Tried::Decided(o) => return Ok((Some(o), busy)),
                Tried::Busy => busy = true,
                Tried::Gone => {}
            }
        }
        Ok((None, busy))
    }

    /// Reserve ourselves, claim `them`, commit (or revert).
    pub(super) async fn pair(&self, me: &Me, them: &Listing, d: f64, tier: Tier) -> Result<Tried> {
        let mid = MatchId::random().to_string();
        let band = band_m(d).to_string();
        let tier = tier_code(tier);
        let now = self.clock.now_ms();
        let their_state = them.state();
        let reserved = self
            .fcall(
                "gm_sh_reserve",
                &[&me.keys.state],
                &[
                    &them.user,
                    &their_state,
                    &mid,
                    &band,
                    tier,
                    &(now + ms(self.hold)).to_string(),
                    &now.to_string(),
                ],
            )
            .await?;
        match word(&reserved) {
            "ok" => {}
            "done" => {
                return Ok(outcome_of(&reserved)?.map_or(Tried::Gone, Tried::Decided));
            }
            // Our own window has passed, or we were withdrawn: stop trying.
            _ => return Ok(Tried::Gone),
        }
        let tombstone = Keys::tombstone(&their_state, &mid);
        let claimed = self
            .fcall(
                "gm_sh_claim",
                &[&their_state, &tombstone],
                &[&me.listing.user, &mid, &band, tier, &now.to_string()],
            )
            .await;
        let claimed = match claimed {
            Ok(c) => c,
            // The claim may or may not have landed: settle it for certain.
            Err(_) => {
                return Ok(self
                    .settle(&me.listing.user, &me.keys.state, true)
                    .await?
                    .map_or(Tried::Gone, Tried::Decided));
            }
        };
        match word(&claimed) {
            "ok" => {
                let (mid, band, tier) =
                    (field(&claimed, 1), field(&claimed, 2), field(&claimed, 3));
                let committed = self
                    .fcall(
                        "gm_sh_commit",
                        &[&me.keys.state],
                        &[&them.user, mid, band, tier],
                    )
                    .await?;
                if word(&committed) != "ok" {
                    return Err(Error::Unavailable(format!(
                        "a claimed shake could not be committed ({})",
                        field(&committed, 1)
                    )));
                }
                self.wake_all(field(&claimed, 4), &their_state);
                // Retries of our own shake waiting through other replicas.
                self.wake_others(field(&committed, 1), &me.keys.state);
                let theirs = index_key_of(them, self.cfg.bucket_resolution);
                self.unlist(
                    &[(&theirs, &them.encode()), (&me.index, &me.listing.encode())],
                    tier == "a",
                );
                Ok(Tried::Decided(matched(&them.user, band, mid, tier)?))
            }
            other => {
                let busy = other == "busy";
                let reverted = self.fcall("gm_sh_revert", &[&me.keys.state], &[]).await?;
                if word(&reverted) == "done" {
                    return Ok(outcome_of(&reverted)?.map_or(Tried::Gone, Tried::Decided));
                }
                Ok(if busy { Tried::Busy } else { Tried::Gone })
            }
        }
    }

    /// Settles a reservation on `user`'s shake `state` (once it has run out, unless `now`): asks its
    /// partner whether the claim landed, then commits or reverts. The outcome when the
    /// shake has one.
    pub(super) async fn settle(
        &self,
        user: &str,
        state: &str,
        now: bool,
    ) -> Result<Option<Outcome>> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(state)
            .arg(&["st", "ri", "rk", "rm", "rx", "p", "d", "mid", "t"][..]);
        let s: Reply = self.conn.query(&cmd).await?;
        match field(&s, 0) {
            "M" => {
                return matched(field(&s, 5), field(&s, 6), field(&s, 7), field(&s, 8)).map(Some);
            }
            "N" => return Ok(Some(Outcome::NoMatch)),
            "R" => {}
            _ => return Ok(None),
        }
        let expired = field(&s, 4)
            .parse::<i64>()
            .is_ok_and(|rx| rx <= self.clock.now_ms());
        if !now && !expired {
            return Ok(None);
        }
        let (partner, their_state, mid) = (field(&s, 1), field(&s, 2), field(&s, 3));
        let keep = ms(self.cfg.window + self.cfg.result_ttl) + 1_000;
        let tombstone = Keys::tombstone(their_state, mid);
        let aborted = self
            .fcall(
                "gm_sh_abort",
                &[their_state, &tombstone],
                &[user, &keep.to_string()],
            )
            .await?;
        if word(&aborted) == "claimed" {
            let (mid, band, tier) = (field(&aborted, 1), field(&aborted, 2), field(&aborted, 3));
            let committed = self
                .fcall("gm_sh_commit", &[state], &[partner, mid, band, tier])
                .await?;
            if word(&committed) == "ok" {
                self.wake_all(field(&committed, 1), state);
                return matched(partner, band, mid, tier).map(Some);
            }
            return Ok(None);
        }
        let reverted = self.fcall("gm_sh_revert", &[state], &[]).await?;
        outcome_of(&reverted)
    }

    /// Drops the listings `(index, listing)` of withdrawn or matched shakes, and their
    /// ANYWHERE pool entries when `pooled` (best effort, in the background: listings only
    /// help others find a shake, a stale one is skipped at its claim, and pool entries
    /// also lapse at their deadline). One round trip per slot.
    pub(super) fn unlist(&self, listed: &[(&str, &str)], pooled: bool) {
        let listed: Vec<(String, String)> = listed
            .iter()
            .filter(|(i, l)| !i.is_empty() && !l.is_empty())
            .map(|(i, l)| ((*i).to_owned(), (*l).to_owned()))
            .collect();
        if listed.is_empty() {
            return;
        }
        let tag = |key: &str| {
            key.split_once('{')
                .and_then(|(_, r)| r.split_once('}'))
                .map(|(t, _)| t.to_owned())
        };
        let mut pipes: Vec<(Option<String>, redis::Pipeline)> = Vec::new();
        for (index, listing) in &listed {
            let t = tag(index);
            let at = match pipes.iter().position(|(p, _)| *p == t) {
                Some(at) => at,
                None => {
                    pipes.push((t, redis::pipe()));
                    pipes.len() - 1
                }
            };
            pipes[at].1.cmd("ZREM").arg(index).arg(listing).ignore();
        }
        if pooled {
            let mut pool = redis::pipe();
            pool.cmd("ZREM").arg(POOL_KEY);
            for (_, listing) in &listed {
                pool.arg(listing);
            }
            pipes.push((None, pool.ignore().clone()));
        }
        let conn = self.conn.clone();
        tokio::spawn(async move {
            for (_, pipe) in pipes {
                let _ = conn.pipe::<()>(&pipe).await;
            }
        });
    }
}
