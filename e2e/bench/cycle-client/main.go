// Command cycle-client drives a CSI node server the way kubelet does: over one gRPC
// connection (grpc-go, like kubelet's), one call at a time. It is the client of
// e2e/bench/publish_cycle.py, so that the figures carry a Go client's cost, not grpclib's.
//
// Each cycle is NodePublishVolume (mount capability, MULTI_NODE_MULTI_WRITER) then
// NodeUnpublishVolume of the same volume at the same target; with -mode empty it is two Probe
// calls instead (the gRPC floor under a cycle). It runs -warmup unmeasured cycles, then
// -cycles measured ones, and prints one JSON object: p50, p99 and mean of the cycle, p50 of
// each half, all in ms.
//
// With -stdin it runs the warm-up, prints {"ready":true}, then reads one count per line from
// stdin and answers each with a JSON line for that many cycles, samples included (how
// publish_cycle.py interleaves its subjects). On EOF, SIGTERM or SIGINT it unpublishes the
// target (cycle mode) and exits.
//
// Usage: cycle-client -endpoint unix:///path/csi.sock -volume-id ID -target DIR
//
//	[-volume-context k=v,k=v] [-mode cycle|empty] [-warmup 30] [-cycles 300] [-stdin]
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

type client struct {
	node     csi.NodeClient
	identity csi.IdentityClient
	timeout  time.Duration
	publish  *csi.NodePublishVolumeRequest
	release  *csi.NodeUnpublishVolumeRequest
	empty    bool
}

// cycle returns the seconds the two calls took.
func (c *client) cycle() (float64, float64, error) {
	first, err := c.timed(func(ctx context.Context) error {
		if c.empty {
			_, err := c.identity.Probe(ctx, &csi.ProbeRequest{})
			return err
		}
		_, err := c.node.NodePublishVolume(ctx, c.publish)
		return err
	})
	if err != nil {
		return 0, 0, err
	}
	second, err := c.timed(func(ctx context.Context) error {
		if c.empty {
			_, err := c.identity.Probe(ctx, &csi.ProbeRequest{})
			return err
		}
		_, err := c.node.NodeUnpublishVolume(ctx, c.release)
		return err
	})
	return first, second, err
}

func (c *client) timed(call func(context.Context) error) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	started := time.Now()
	err := call(ctx)
	return time.Since(started).Seconds(), err
}

// ready waits for Probe to answer ready=true (the server may still be starting).
func (c *client) ready(deadline time.Time) error {
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := c.identity.Probe(ctx, &csi.ProbeRequest{})
		cancel()
		if err == nil && resp.GetReady().GetValue() {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no Probe with ready=true (last error: %v)", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type result struct {
	Client      string    `json:"client"`
	Mode        string    `json:"mode"`
	Cycles      int       `json:"cycles"`
	P50         float64   `json:"p50_ms"`
	P99         float64   `json:"p99_ms"`
	Mean        float64   `json:"mean_ms"`
	PublishP50  float64   `json:"publish_p50_ms"`
	ReleaseP50  float64   `json:"unpublish_p50_ms"`
	Publish     []float64 `json:"publish_s,omitempty"`
	Unpublish   []float64 `json:"unpublish_s,omitempty"`
	FailedAfter *int      `json:"failed_after,omitempty"`
	Error       string    `json:"error,omitempty"`
}

// percentile is nearest-rank (a value that was measured), as in benchlib.py.
func percentile(values []float64, q float64) float64 {
	if len(values) == 0 {
		return 0
	}
	ordered := append([]float64(nil), values...)
	sort.Float64s(ordered)
	rank := int(math.Ceil(q / 100 * float64(len(ordered))))
	return ordered[max(rank, 1)-1]
}

func (c *client) run(mode string, n int, samples bool) result {
	res := result{Client: "go", Mode: mode}
	var publish, unpublish, cycle []float64
	for i := 0; i < n; i++ {
		p, u, err := c.cycle()
		if err != nil {
			res.FailedAfter, res.Error = &i, err.Error()
			break
		}
		publish, unpublish, cycle = append(publish, p), append(unpublish, u), append(cycle, p+u)
	}
	res.Cycles = len(cycle)
	if res.Cycles == 0 {
		return res
	}
	sum := 0.0
	for _, v := range cycle {
		sum += v
	}
	res.P50, res.P99 = percentile(cycle, 50)*1e3, percentile(cycle, 99)*1e3
	res.Mean = sum / float64(len(cycle)) * 1e3
	res.PublishP50, res.ReleaseP50 = percentile(publish, 50)*1e3, percentile(unpublish, 50)*1e3
	if samples {
		res.Publish, res.Unpublish = publish, unpublish
	}
	return res
}

func parseContext(value string) (map[string]string, error) {
	context := map[string]string{}
	if value == "" {
		return context, nil
	}
	for _, pair := range strings.Split(value, ",") {
		key, val, ok := strings.Cut(pair, "=")
		if !ok || key == "" {
			return nil, fmt.Errorf("-volume-context: %q is not key=value", pair)
		}
		context[key] = val
	}
	return context, nil
}

func main() {
	endpoint := flag.String("endpoint", "", "CSI endpoint, unix:///path/csi.sock")
	mode := flag.String("mode", "cycle", "cycle (NodePublish + NodeUnpublish) or empty (two Probe calls)")
	volumeID := flag.String("volume-id", "bench-go-client", "volume ID to publish")
	volumeContext := flag.String("volume-context", "", "volume context, k=v,k=v")
	target := flag.String("target", "", "target path to publish at (cycle mode)")
	warmup := flag.Int("warmup", 30, "unmeasured cycles first")
	cycles := flag.Int("cycles", 300, "measured cycles (without -stdin)")
	stdin := flag.Bool("stdin", false, "after the warm-up, run as many cycles as each stdin line says")
	timeout := flag.Duration("rpc-timeout", 30*time.Second, "deadline of each call")
	flag.Parse()
	fail := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "cycle-client: "+format+"\n", args...)
		os.Exit(2)
	}
	if !strings.HasPrefix(*endpoint, "unix://") {
		fail("-endpoint must be unix:///path (only unix sockets)")
	}
	if *mode != "cycle" && *mode != "empty" {
		fail("-mode must be cycle or empty")
	}
	if *mode == "cycle" && *target == "" {
		fail("-target is required in cycle mode")
	}
	volCtx, err := parseContext(*volumeContext)
	if err != nil {
		fail("%v", err)
	}

	conn, err := grpc.NewClient(*endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail("%v", err)
	}
	defer conn.Close()
	c := &client{
		node:     csi.NewNodeClient(conn),
		identity: csi.NewIdentityClient(conn),
		timeout:  *timeout,
		empty:    *mode == "empty",
		publish: &csi.NodePublishVolumeRequest{
			VolumeId:   *volumeID,
			TargetPath: *target,
			VolumeCapability: &csi.VolumeCapability{
				AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
				AccessMode: &csi.VolumeCapability_AccessMode{
					Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER,
				},
			},
			VolumeContext: volCtx,
		},
		release: &csi.NodeUnpublishVolumeRequest{VolumeId: *volumeID, TargetPath: *target},
	}
	cleanup := func() {
		if !c.empty {
			ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
			defer cancel()
			if _, err := c.node.NodeUnpublishVolume(ctx, c.release); err != nil {
				fmt.Fprintf(os.Stderr, "cycle-client: cleanup unpublish of %s: %v\n", *target, err)
			}
		}
	}
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	go func() {
		<-signals
		cleanup()
		os.Exit(1)
	}()

	if err := c.ready(time.Now().Add(30 * time.Second)); err != nil {
		fail("%v", err)
	}
	out := json.NewEncoder(os.Stdout)
	if res := c.run(*mode, *warmup, false); res.Error != "" {
		cleanup()
		fail("warm-up: %s", res.Error)
	}
	if !*stdin {
		res := c.run(*mode, *cycles, false)
		cleanup()
		_ = out.Encode(res)
		if res.Error != "" {
			os.Exit(1)
		}
		return
	}
	_ = out.Encode(map[string]bool{"ready": true})
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		n, err := strconv.Atoi(strings.TrimSpace(lines.Text()))
		if err != nil || n < 0 {
			_ = out.Encode(result{Client: "go", Mode: *mode, Error: fmt.Sprintf("bad count %q", lines.Text())})
			continue
		}
		_ = out.Encode(c.run(*mode, n, true))
	}
	cleanup()
}
