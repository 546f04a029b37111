// Command native-histogram-vectors generates golden vectors for Prometheus
// native histogram bucket placement, using Debian's client_golang 1.14 as the
// reference implementation. The output is deterministic (byte-identical on
// re-runs).
//
// Regenerate from the repository root (offline, GOPATH mode; needs Debian's
// golang-go and golang-github-prometheus-client-golang-dev):
//
//	GOPATH=/usr/share/gocode GO111MODULE=off GOFLAGS=-mod=mod GOPROXY=off GOCACHE=/tmp/gocache go run ./tools/native-histogram-vectors | gzip -9n > tests/data/native_histogram_vectors.json.gz
//
// All f64 values in the output are written as 16-hex-digit bit patterns
// ("0x3ff0000000000000" is 1.0) so that NaN, -0 and infinities survive JSON.
//
// The vectors record what client_golang 1.14 does, including its quirks (for
// schemas < 0 it computes the bucket key as (key + div - 1) / div with Go's
// truncating division, which disagrees with the bucket definition for some
// values below 1). Do not "fix" the output.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

const generator = "tools/native-histogram-vectors (client_golang 1.14)"

// hexf formats the bit pattern of v as "0x" followed by 16 hex digits.
func hexf(v float64) string { return fmt.Sprintf("0x%016x", math.Float64bits(v)) }

func fromBits(b uint64) float64 { return math.Float64frombits(b) }

// neg flips the sign bit (also for NaN and zero).
func neg(v float64) float64 { return fromBits(math.Float64bits(v) ^ (1 << 63)) }

// factorForSchema returns a bucket factor that makes client_golang pick schema s.
func factorForSchema(s int) float64 {
	return math.Pow(2, math.Pow(2, float64(-s))) * (1 + 1e-9)
}

// ztOption maps an effective zero threshold to the HistogramOpts value:
// 0 must be passed as a negative value (0 would mean the default 2^-128).
func ztOption(zt float64) float64 {
	if zt == 0 {
		return prometheus.NativeHistogramZeroThresholdZero
	}
	return zt
}

func newHist(factor, zt float64, maxBuckets uint32) prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:                           "x",
		Help:                           "x",
		NativeHistogramBucketFactor:    factor,
		NativeHistogramZeroThreshold:   ztOption(zt),
		NativeHistogramMaxBucketNumber: maxBuckets,
	})
}

func writeHist(h prometheus.Histogram) *dto.Histogram {
	m := &dto.Metric{}
	if err := h.Write(m); err != nil {
		panic(err)
	}
	if m.Histogram == nil || m.Histogram.Schema == nil {
		panic("no native histogram written")
	}
	return m.Histogram
}

// ---------------------------------------------------------------------------
// bucket_factors

type bucketFactor struct {
	Factor float64 `json:"factor"`
	Schema int32   `json:"schema"`
}

func bucketFactors() []bucketFactor {
	factors := []float64{1.0001, 1.001, 1.005, 1.01, 1.05, 1.1, 1.2, 1.5, 2, 3, 4, 10, 100, 1000, 65536, 1e6, 1e100}
	out := make([]bucketFactor, 0, len(factors))
	for _, f := range factors {
		h := newHist(f, 0, 0)
		h.Observe(1)
		out = append(out, bucketFactor{Factor: f, Schema: writeHist(h).GetSchema()})
	}
	return out
}

// ---------------------------------------------------------------------------
// placements

type placement struct {
	Schema        int32  `json:"schema"`
	ZeroThreshold string `json:"zero_threshold"`
	Value         string `json:"value"`
	Bucket        string `json:"bucket"`
	Index         *int32 `json:"index,omitempty"`
}

// Zero thresholds (effective values): default 2^-128, 0, 1e-9, 2^-1022.
var zeroThresholds = []float64{prometheus.DefNativeHistogramZeroThreshold, 0, 1e-9, 0x1p-1022}

// Exponents used for the power-of-two sweep when it is not complete.
var fewPowers = []int{-1074, -1022, -200, -128, -40, -20, -3, -2, -1, 0, 1, 2, 3, 10, 20, 100, 1000, 1023}

// fullSweepSchema reports whether the complete 2^-1074..2^1023 sweep is used
// for (schema, default threshold). Other schemas get a thinned sweep to keep
// the file size reasonable.
func fullSweepSchema(s int) bool { return s == -4 || s == 0 || s == 3 || s == 8 }

// thinnedPowers: fewPowers plus contiguous ranges (so every residue modulo
// 2^-schema is covered for negative schemas) at the subnormal end, around
// 2^-128, around 1 and at the top end.
func thinnedPowers() []int {
	var ks []int
	add := func(lo, hi int) {
		for k := lo; k <= hi; k++ {
			ks = append(ks, k)
		}
	}
	add(-1074, -1056)
	add(-1040, -1008)
	add(-144, -112)
	add(-40, 40)
	add(1005, 1023)
	return append(ks, fewPowers...)
}

func placementValues(schema int, zt float64) []float64 {
	var vs []float64
	vs = append(vs,
		0,
		neg(0),
		fromBits(1),                  // smallest subnormal 5e-324
		fromBits(0x0000000deadbeef0), // mid subnormal
		fromBits(0x000fffffffffffff), // largest subnormal
	)
	ulps := func(v float64) {
		vs = append(vs, math.Nextafter(v, 0), v, math.Nextafter(v, math.Inf(1)))
	}
	ulps(0x1p-1022) // smallest normal
	ulps(0x1p-128)  // default zero threshold

	var ks []int
	switch {
	case zt != prometheus.DefNativeHistogramZeroThreshold:
		ks = fewPowers
	case fullSweepSchema(schema):
		for k := -1074; k <= 1023; k++ {
			ks = append(ks, k)
		}
	default:
		ks = thinnedPowers()
	}
	for _, k := range ks {
		ulps(math.Ldexp(1, k))
	}

	vs = append(vs, 1e-6, 1e-5, 2.5e-5, 1e-4, 0.001, 0.0123, 0.1, 0.5, 1, 1.1, 1.5, 2.5, 10, 1e10, 1e300,
		math.MaxFloat64, math.Inf(1), math.NaN())

	if schema >= 1 {
		n := 1 << schema
		for j := 1; j < n; j++ {
			v := math.Pow(2, float64(j)/float64(n))
			for _, b := range []float64{math.Nextafter(v, 0), v, math.Nextafter(v, math.Inf(1))} {
				vs = append(vs, b, b*0x1p-20, b*0x1p20)
			}
		}
	}

	all := make([]float64, 0, 2*len(vs))
	all = append(all, vs...)
	for _, v := range vs {
		all = append(all, neg(v))
	}
	seen := make(map[uint64]bool, len(all))
	out := all[:0]
	for _, v := range all {
		b := math.Float64bits(v)
		if seen[b] {
			continue
		}
		seen[b] = true
		out = append(out, v)
	}
	return out
}

func singleBucket(spans []*dto.BucketSpan, deltas []int64) (int32, bool) {
	if len(spans) == 0 && len(deltas) == 0 {
		return 0, false
	}
	if len(spans) != 1 || spans[0].GetLength() != 1 || len(deltas) != 1 || deltas[0] != 1 {
		panic(fmt.Sprintf("unexpected buckets for a single observation: %v %v", spans, deltas))
	}
	return spans[0].GetOffset(), true
}

func place(schema int, zt, v float64) placement {
	h := newHist(factorForSchema(schema), zt, 0)
	h.Observe(v)
	his := writeHist(h)
	if his.GetSchema() != int32(schema) {
		panic(fmt.Sprintf("wanted schema %d, got %d", schema, his.GetSchema()))
	}
	if math.Float64bits(his.GetZeroThreshold()) != math.Float64bits(zt) {
		panic(fmt.Sprintf("wanted zero threshold %g, got %g", zt, his.GetZeroThreshold()))
	}
	if his.GetSampleCount() != 1 {
		panic("sample count != 1")
	}
	p := placement{Schema: int32(schema), ZeroThreshold: hexf(zt), Value: hexf(v)}
	pi, pok := singleBucket(his.PositiveSpan, his.PositiveDelta)
	ni, nok := singleBucket(his.NegativeSpan, his.NegativeDelta)
	zc := his.GetZeroCount()
	switch {
	case zc == 1 && !pok && !nok:
		p.Bucket = "zero"
	case zc == 0 && pok && !nok:
		p.Bucket = "positive"
		p.Index = &pi
	case zc == 0 && !pok && nok:
		p.Bucket = "negative"
		p.Index = &ni
	case zc == 0 && !pok && !nok:
		p.Bucket = "none"
	default:
		panic(fmt.Sprintf("ambiguous placement for %s: %v", hexf(v), his))
	}
	return p
}

func placements() []placement {
	var out []placement
	for s := -4; s <= 8; s++ {
		for _, zt := range zeroThresholds {
			for _, v := range placementValues(s, zt) {
				out = append(out, place(s, zt, v))
			}
		}
	}
	return out
}

// ---------------------------------------------------------------------------
// histograms

type histCase struct {
	Name             string     `json:"name"`
	Schema           int32      `json:"schema"`
	ZeroThreshold    string     `json:"zero_threshold"`
	MaxBuckets       uint32     `json:"max_buckets"`
	Values           []string   `json:"values"`
	ResultSchema     int32      `json:"result_schema"`
	ZeroThresholdOut string     `json:"zero_threshold_out"`
	ZeroCount        uint64     `json:"zero_count"`
	Count            uint64     `json:"count"`
	PositiveSpans    [][2]int64 `json:"positive_spans"`
	PositiveDeltas   []int64    `json:"positive_deltas"`
	NegativeSpans    [][2]int64 `json:"negative_spans"`
	NegativeDeltas   []int64    `json:"negative_deltas"`
}

func spansOf(spans []*dto.BucketSpan) [][2]int64 {
	out := make([][2]int64, 0, len(spans))
	for _, sp := range spans {
		out = append(out, [2]int64{int64(sp.GetOffset()), int64(sp.GetLength())})
	}
	return out
}

func deltasOf(d []int64) []int64 {
	out := make([]int64, 0, len(d))
	return append(out, d...)
}

func runCase(name string, schema int, zt float64, maxBuckets uint32, values []float64) histCase {
	// Check the schema chosen from the factor on a throwaway histogram
	// (the real one may reduce its schema when maxBuckets is exceeded).
	probe := newHist(factorForSchema(schema), zt, 0)
	probe.Observe(1)
	if got := writeHist(probe).GetSchema(); got != int32(schema) {
		panic(fmt.Sprintf("%s: wanted schema %d, got %d", name, schema, got))
	}

	h := newHist(factorForSchema(schema), zt, maxBuckets)
	vs := make([]string, 0, len(values))
	for _, v := range values {
		h.Observe(v)
		vs = append(vs, hexf(v))
	}
	his := writeHist(h)
	if maxBuckets == 0 && his.GetSchema() != int32(schema) {
		panic(fmt.Sprintf("%s: wanted schema %d, got %d", name, schema, his.GetSchema()))
	}
	return histCase{
		Name:             name,
		Schema:           int32(schema),
		ZeroThreshold:    hexf(zt),
		MaxBuckets:       maxBuckets,
		Values:           vs,
		ResultSchema:     his.GetSchema(),
		ZeroThresholdOut: hexf(his.GetZeroThreshold()),
		ZeroCount:        his.GetZeroCount(),
		Count:            his.GetSampleCount(),
		PositiveSpans:    spansOf(his.PositiveSpan),
		PositiveDeltas:   deltasOf(his.PositiveDelta),
		NegativeSpans:    spansOf(his.NegativeSpan),
		NegativeDeltas:   deltasOf(his.NegativeDelta),
	}
}

// latencyValues returns n log-uniform values in [1e-5, 10) from a fixed
// 64-bit LCG (Knuth's MMIX constants).
func latencyValues(n int) []float64 {
	x := uint64(0x2545f4914f6cdd1d)
	out := make([]float64, 0, n)
	for i := 0; i < n; i++ {
		x = x*6364136223846793005 + 1442695040888963407
		u := float64(x>>11) / (1 << 53) // [0, 1)
		out = append(out, 1e-5*math.Pow(10, 6*u))
	}
	return out
}

// repeat returns v repeated n times.
func repeat(v float64, n int) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = v
	}
	return out
}

func concat(parts ...[]float64) []float64 {
	var out []float64
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// mid returns a value in the middle of bucket i at schema s (by the
// definition: bucket i covers (2^((i-1)/2^s), 2^(i/2^s)]).
func mid(s, i int) float64 {
	return math.Pow(2, (float64(i)-0.5)/math.Pow(2, float64(s)))
}

func histograms() []histCase {
	def := prometheus.DefNativeHistogramZeroThreshold
	inf := math.Inf(1)
	nan := math.NaN()
	lat := latencyValues(2000)

	var out []histCase
	add := func(name string, schema int, zt float64, maxBuckets uint32, values []float64) {
		out = append(out, runCase(name, schema, zt, maxBuckets, values))
	}

	// (a), (b) latency-like values.
	add("latency log-uniform 1e-5..10, 2000 values, schema 3, unlimited", 3, def, 0, lat)
	add("latency log-uniform 1e-5..10, 2000 values, schema 3, max 160 buckets", 3, def, 160, lat)
	add("latency log-uniform 1e-5..10, 2000 values, schema 3, max 20 buckets", 3, def, 20, lat)
	add("latency log-uniform 1e-5..10, 2000 values, schema 3, max 3 buckets", 3, def, 3, lat)
	add("latency log-uniform 1e-5..10, first 200 values, schema 8, max 100 buckets", 8, def, 100, lat[:200])
	add("latency log-uniform 1e-5..10, 2000 values, negated, schema 3, max 40 buckets", 3, def, 40, negAll(lat))

	// (c) gaps of exactly 1, 2, 3 and 4 empty buckets at schema 0.
	// Schema 0 bucket i covers (2^(i-1), 2^i]; 2^i is the top of bucket i.
	p2 := func(i int) float64 { return math.Ldexp(1, i) }
	add("schema 0 gaps of 1,2,3,4 empty buckets (buckets 0,2,5,9,14)", 0, def, 0,
		[]float64{p2(0), p2(2), p2(5), p2(9), p2(14)})
	add("schema 0 gap of 1 empty bucket (buckets 0,2)", 0, def, 0, []float64{1, 3})
	add("schema 0 gap of 2 empty buckets (buckets 0,3)", 0, def, 0, []float64{1, 6})
	add("schema 0 gap of 3 empty buckets (buckets 0,4)", 0, def, 0, []float64{1, 12})
	add("schema 0 gap of 4 empty buckets (buckets 0,5)", 0, def, 0, []float64{1, 24})
	add("schema 0 gaps on both signs with repeated values", 0, def, 0, concat(
		repeat(1, 3), repeat(4, 1), repeat(32, 2), repeat(512, 5), repeat(16384, 1),
		repeat(-0.75, 2), repeat(-3, 4), repeat(-24, 1), repeat(-100, 3), repeat(-1e6, 2)))

	// (d) mixed negatives, zeros, infinities and NaN at schema 2.
	add("schema 2 mixed negatives, zeros, +Inf, -Inf, NaN", 2, def, 0, []float64{
		-1, -2.5, -0.001, 0, neg(0), 1e-40, -1e-40, inf, -inf, nan, neg(nan), nan,
		3, 3.1, 1e300, -math.MaxFloat64, math.MaxFloat64, inf, -1, -1.2, 0.7, 1e-300, -5e-324,
	})
	add("schema 2 zero threshold 0: zeros, subnormals, infinities, NaN", 2, 0, 0, []float64{
		0, neg(0), 0, 5e-324, -5e-324, fromBits(0x000fffffffffffff), 0x1p-1022, -0x1p-1022,
		1e-40, inf, -inf, nan, 1, -1,
	})
	add("schema 2 zero threshold 1e-9: values around the threshold", 2, 1e-9, 0, []float64{
		1e-9, math.Nextafter(1e-9, 1), -1e-9, math.Nextafter(-1e-9, -1), 1e-10, -1e-12, 0, 2e-9, 1e-8, -1e-8, 1,
	})

	// (e) schema 8 and schema -4 with a spread of values.
	spread := []float64{
		1e-30, 3e-20, 1e-12, 2e-9, 1e-6, 0.0001, 0.001, 0.00390625, 0.01, 0.05, 0.1, 0.25, 0.3, 0.5, 0.7,
		1, 1.0001, 1.001, 1.003, 1.01, 1.1, 1.5, 2, 3, 10, 100, 1e4, 65536, 65537, 1e6, 1e12, 1e30,
		-1e-20, -0.001, -0.3, -1, -1.001, -7, -65536, -1e9,
	}
	add("schema 8 spread of values", 8, def, 0, spread)
	add("schema -4 spread of values", -4, def, 0, spread)
	add("schema -4 powers of two 2^-40..2^40", -4, def, 0, powersOfTwo(-40, 40, 1))
	add("schema -2 powers of two 2^-20..2^20 and negated", -2, def, 0, concat(powersOfTwo(-20, 20, 1), negAll(powersOfTwo(-20, 20, 1))))
	add("schema -1 values 2^-9..2^9 (half steps)", -1, def, 0, powersOfTwo(-18, 18, 0.5))

	// (f) several observations per bucket so deltas go up and down.
	add("schema 3 repeated observations, deltas up and down", 3, def, 0, concat(
		repeat(mid(3, 0), 5), repeat(mid(3, 1), 2), repeat(mid(3, 2), 7), repeat(mid(3, 3), 1),
		repeat(mid(3, 5), 3), repeat(mid(3, 6), 3), repeat(mid(3, 7), 10), repeat(mid(3, 11), 4),
		repeat(mid(3, 12), 1), repeat(-mid(3, -4), 6), repeat(-mid(3, -3), 2), repeat(-mid(3, 0), 9),
		repeat(-mid(3, 2), 1)))
	add("schema 3 repeated observations interleaved", 3, def, 0, interleave(
		repeat(mid(3, 0), 4), repeat(mid(3, 1), 1), repeat(mid(3, 2), 6), repeat(mid(3, 4), 2)))

	// Resolution reduction with values below 1 (negative bucket keys).
	add("schema 0 values below 1, max 2 buckets", 0, def, 2, []float64{
		0.3, 0.1, 0.01, 0.7, 0.001, 1e-4, 0.04, 0.2, 0.5, 0.9, 1.5, 3,
	})
	add("schema 2 values below 1 and negated, max 4 buckets", 2, def, 4, []float64{
		0.9, -0.9, 0.6, -0.45, 0.3, 0.2, -0.1, 0.05, 0.02, -0.007, 1e-3, 2e-4, 0.5, 0.25, 0.125,
	})
	return out
}

func negAll(vs []float64) []float64 {
	out := make([]float64, len(vs))
	for i, v := range vs {
		out[i] = neg(v)
	}
	return out
}

// powersOfTwo returns 2^k for k = lo, lo+step, ..., hi.
func powersOfTwo(lo, hi, step float64) []float64 {
	var out []float64
	for k := lo; k <= hi; k += step {
		out = append(out, math.Pow(2, k))
	}
	return out
}

// interleave takes one value from each non-empty list in turn.
func interleave(lists ...[]float64) []float64 {
	var out []float64
	for more := true; more; {
		more = false
		for i := range lists {
			if len(lists[i]) > 0 {
				out = append(out, lists[i][0])
				lists[i] = lists[i][1:]
				more = true
			}
		}
	}
	return out
}

// ---------------------------------------------------------------------------
// output

func marshal(v interface{}) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic(err)
	}
	return bytes.TrimRight(buf.Bytes(), "\n")
}

func writeArray(w *bufio.Writer, key string, n int, elem func(i int) interface{}, last bool) {
	fmt.Fprintf(w, "  %q: [\n", key)
	for i := 0; i < n; i++ {
		w.WriteString("    ")
		w.Write(marshal(elem(i)))
		if i+1 < n {
			w.WriteString(",")
		}
		w.WriteString("\n")
	}
	if last {
		w.WriteString("  ]\n")
	} else {
		w.WriteString("  ],\n")
	}
}

func main() {
	bf := bucketFactors()
	pl := placements()
	hs := histograms()

	w := bufio.NewWriterSize(os.Stdout, 1<<20)
	w.WriteString("{\n")
	fmt.Fprintf(w, "  \"generator\": %s,\n", marshal(generator))
	writeArray(w, "bucket_factors", len(bf), func(i int) interface{} { return bf[i] }, false)
	writeArray(w, "placements", len(pl), func(i int) interface{} { return pl[i] }, false)
	writeArray(w, "histograms", len(hs), func(i int) interface{} { return hs[i] }, true)
	w.WriteString("}\n")
	if err := w.Flush(); err != nil {
		panic(err)
	}
}
