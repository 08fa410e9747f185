// A load client for benches/load.py's intercepted-tunnel row: what wrk cannot do (CONNECT,
// then TLS to the proxy's minted certificate, then keep-alive requests inside).
//
//	go run benches/tunnel_load.go -proxy http://127.0.0.1:8080 -token T -ca ca.pem \
//	    -url https://api.bench.test:8443/path -c 64 -d 10s [-delay 5ms [-jitter]] [-workspaces 1000]
//
// Each of the -c connections is its own HTTP client with one keep-alive tunnel, for
// workspace ws_<i mod workspaces> (the proxy URL's user name). It prints one JSON line in the
// shape of load.py's wrk script: requests, duration_us, error counts, p50_us, p99_us.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"net/url"
	"os"
	"sort"
	"sync"
	"time"
)

func main() {
	proxy := flag.String("proxy", "", "the proxy's base URL, http://host:port")
	token := flag.String("token", "", "the caller token")
	caFile := flag.String("ca", "", "the proxy's interception CA (PEM)")
	target := flag.String("url", "", "the https:// URL to request")
	conns := flag.Int("c", 64, "connections")
	duration := flag.Duration("d", 10*time.Second, "how long")
	delay := flag.Duration("delay", 0, "wait between a response and the next request")
	jitter := flag.Bool("jitter", false, "wait a uniformly random time in [0, 2*delay] instead (same mean)")
	workspaces := flag.Int("workspaces", 1000, "workspaces, one per connection in turn")
	flag.Parse()

	pem, err := os.ReadFile(*caFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)

	var mu sync.Mutex
	var latencies []time.Duration
	errors := 0
	deadline := time.Now().Add(*duration)
	start := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < *conns; i++ {
		proxyURL, err := url.Parse(*proxy)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		proxyURL.User = url.UserPassword(fmt.Sprintf("ws_%d", i%*workspaces), *token)
		client := &http.Client{
			Timeout: 5 * time.Second,
			Transport: &http.Transport{
				Proxy:               http.ProxyURL(proxyURL),
				TLSClientConfig:     &tls.Config{RootCAs: roots},
				MaxIdleConnsPerHost: 1,
				DisableCompression:  true,
				ForceAttemptHTTP2:   false,
			},
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			failed := 0
			for time.Now().Before(deadline) {
				t0 := time.Now()
				resp, err := client.Get(*target)
				if err != nil {
					failed++
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					failed++
				} else {
					mine = append(mine, time.Since(t0))
				}
				if *delay > 0 && *jitter {
					time.Sleep(time.Duration(rand.Int63n(2*int64(*delay) + 1)))
				} else if *delay > 0 {
					time.Sleep(*delay)
				}
			}
			mu.Lock()
			latencies = append(latencies, mine...)
			errors += failed
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	sort.Slice(latencies, func(a, b int) bool { return latencies[a] < latencies[b] })
	pct := func(p float64) int64 {
		if len(latencies) == 0 {
			return 0
		}
		return latencies[int(p*float64(len(latencies)-1))].Microseconds()
	}
	out, _ := json.Marshal(map[string]int64{
		"requests":    int64(len(latencies) + errors),
		"duration_us": elapsed.Microseconds(),
		"connect":     0,
		"read":        0,
		"write":       0,
		"status":      int64(errors),
		"timeout":     0,
		"p50_us":      pct(0.50),
		"p99_us":      pct(0.99),
	})
	fmt.Println(string(out))
}
